"""Reference images onto a fixed canvas, as the released BindWeave's inference prepares them.

The release (``wan_pipeline_s2v.py``'s ``RefTransform``, facts in docs/weights.md) shrinks each
reference (never enlarges it) to fit a 1280x720 canvas, keeping its aspect: the scale is
``min(W / w, H / h, 1)``, the new size is truncated to integers, the resampling is LANCZOS, the
image is pasted centred (``(W - w') // 2``, ``(H - h') // 2``) on a *black* canvas, and the
letterbox mask is 1 where it was pasted (its alpha > 127). The paper's layout keeps
:func:`bindweave.model.batch.fit_reference` (bicubic, enlarging allowed, white canvas).

    canvas = ReferenceCanvas()                   # the release's rule
    image, mask = canvas.fit(pil_image, 720, 1280)   # (3, H, W) in [-1, 1], (H, W) bool
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image

from bindweave.model.batch import to_rgb

_RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
             "bilinear": Image.Resampling.BILINEAR}


@dataclass
class ReferenceCanvas:
    """How a reference image is fitted into the video size.

    Args:
        resample: PIL resampling filter (release: ``lanczos``).
        upscale: allow enlarging a reference smaller than the canvas (release: False).
        fill: grey level of the canvas around the image (release: 0, black; paper: 255).
        rounding: new size from the scale: ``floor`` (release: ``int()``) or ``round``.
    """

    resample: Literal["lanczos", "bicubic", "bilinear"] = "lanczos"
    upscale: bool = False
    fill: int = 0
    rounding: Literal["floor", "round"] = "floor"

    def fit(self, image: Image.Image, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, H, W) float in [-1, 1] and the (H, W) bool letterbox mask (True where the image lies)."""
        image = to_rgb(image)
        scale = min(width / image.width, height / image.height)
        if not self.upscale:
            scale = min(scale, 1.0)
        size = (image.width * scale, image.height * scale)
        new_w, new_h = (max(1, int(s)) if self.rounding == "floor" else max(1, round(s)) for s in size)
        resized = image.resize((new_w, new_h), _RESAMPLE[self.resample])
        canvas = Image.new("RGB", (width, height), (self.fill,) * 3)
        left, top = (width - new_w) // 2, (height - new_h) // 2
        canvas.paste(resized, (left, top))
        pixels = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).view(height, width, 3)
        tensor = pixels.permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W)
        mask = torch.zeros(height, width, dtype=torch.bool)
        mask[top: top + new_h, left: left + new_w] = True  # (H, W)
        return tensor, mask
