"""The batch contract between data and model, and the checks on what users feed in.

A training batch is a dict:

* ``video``: (B, 3, F, H, W) float in [-1, 1], F = 1 + 4k;
* ``prompt``: list[str] of length B;
* ``references``: (B, N, 3, H, W) float in [-1, 1], zero-padded to the batch's largest count N;
* ``num_references``: list[int], the real references of each sample (host-side, so masks never
  need a device sync);
* ``id``: list[str] (optional).

A predict batch has the same keys except ``video``, plus ``seed``: list[int] (optional).
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from bindweave.host_copy import count_mask

VAE_TEMPORAL = 4
"""Frames per latent frame of the Wan VAE (after the first)."""


def check_num_frames(num_frames: int) -> None:
    """Raise unless ``num_frames`` is 1 + 4k (what the Wan VAE's causal temporal compression takes)."""
    if num_frames < 1 or (num_frames - 1) % VAE_TEMPORAL:
        lower = max(1, num_frames - (num_frames - 1) % VAE_TEMPORAL)
        raise ValueError(
            f"num_frames={num_frames} is not 1 + 4k; the Wan VAE needs 1 + 4k frames. "
            f"Use {lower} or {lower + VAE_TEMPORAL}."
        )


def check_spatial_size(height: int, width: int, multiple: int) -> None:
    """Raise unless height and width are positive multiples of ``multiple`` (VAE stride × patch)."""
    for name, size in (("height", height), ("width", width)):
        if size < multiple or size % multiple:
            nearest = max(multiple, round(size / multiple) * multiple)
            raise ValueError(
                f"{name}={size} cannot be encoded and patchified: it must be a multiple of {multiple} "
                f"(VAE stride × DiT patch). Use {nearest}."
            )


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert a reference image to RGB: alpha is composited on ``background``, grey/palette/CMYK
    are converted (:func:`reference_warnings` says which conversions a user should hear about);
    modes with no sensible RGB meaning (e.g. 16-bit depth maps) raise."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if image.mode in ("L", "P", "CMYK", "YCbCr", "1", "LAB", "HSV"):
        return image.convert("RGB")
    raise ValueError(
        f"Reference image mode {image.mode!r} is not a colour photo (e.g. 16-bit or float data); "
        f"save the reference as an 8-bit RGB/RGBA/greyscale PNG or JPEG."
    )


MAX_UPSCALE = 4.0
"""A reference enlarged more than this (per side) to fit the video gets a warning: it has under a
quarter of the pixels per side it is shown at, so its subject reaches the model blurred."""

CONVERTED_MODES = {
    "CMYK": "CMYK, converted to RGB without its colour profile, so colours may shift; save it as RGB",
    "P": "a palette image (at most 256 colours), converted to RGB; use a full-colour original if it looks banded",
    "PA": "a palette image (at most 256 colours), converted to RGB; use a full-colour original if it looks banded",
    "1": "black-and-white (1 bit per pixel), converted to RGB; save it as greyscale or RGB",
    "YCbCr": "in YCbCr, converted to RGB; save it as RGB",
    "LAB": "in LAB colour, converted to RGB without a colour profile; save it as RGB",
    "HSV": "in HSV, converted to RGB; save it as RGB",
}
"""Colour modes :func:`to_rgb` converts that :func:`reference_warnings` reports, with the fix (RGB,
RGBA and 8-bit greyscale are ordinary; a 16-bit RGB PNG opens as 8-bit RGB, what the model reads)."""


def reference_warnings(image: Image.Image, height: int, width: int) -> list[str]:
    """What fitting ``image`` into (height, width) does that its user should hear about, one phrase
    each (empty for an ordinary RGB, RGBA or greyscale image of a reasonable size):

    * an unusual colour mode converted by :func:`to_rgb` (:data:`CONVERTED_MODES`);
    * transparency that hides the whole image (it becomes a blank white reference);
    * an upscale of more than :data:`MAX_UPSCALE` per side to fit the video.

    Modes :func:`to_rgb` rejects are not reported here: :func:`fit_reference` raises for them.
    """
    notes = []
    if image.mode in CONVERTED_MODES:
        notes.append(CONVERTED_MODES[image.mode])
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        if image.convert("RGBA").getchannel("A").getextrema()[1] == 0:
            notes.append("fully transparent, so it becomes a blank white image; check its alpha channel")
    scale = min(height / image.height, width / image.width)
    if scale > MAX_UPSCALE:
        least = [math.ceil(side * scale / MAX_UPSCALE) for side in image.size]
        notes.append(
            f"{image.width}x{image.height} pixels, enlarged {scale:.1f}x to fit the {width}x{height} video "
            f"(more than {MAX_UPSCALE:g}x: expect a blurred subject); give one of at least {least[0]}x{least[1]} pixels"
        )
    return notes


def fit_reference(image: Image.Image, height: int, width: int, fill: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize a reference to fit (height, width) keeping its aspect, centred on a ``fill`` canvas.

    Returns the image (3, H, W) in [-1, 1] and the mask (H, W) of where the reference lies.
    """
    image = to_rgb(image)
    scale = min(height / image.height, width / image.width)
    new_w, new_h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (width, height), (fill, fill, fill))
    left, top = (width - new_w) // 2, (height - new_h) // 2
    canvas.paste(resized, (left, top))
    pixels = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).view(height, width, 3)
    tensor = pixels.permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W)
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[top : top + new_h, left : left + new_w] = True
    return tensor, mask


def collate(samples: list[dict]) -> dict:
    """Collate samples (``video`` (3, F, H, W), ``prompt``, ``references`` (n, 3, H, W), ...) into a
    batch, zero-padding references to the largest count."""
    batch: dict = {}
    counts = [int(s["references"].shape[0]) for s in samples]
    most = max(counts)
    refs = samples[0]["references"]
    references = refs.new_zeros(len(samples), most, *refs.shape[1:])  # (B, N, 3, H, W)
    for i, s in enumerate(samples):
        references[i, : counts[i]] = s["references"]
    batch["references"] = references
    batch["num_references"] = counts
    if "reference_masks" in samples[0]:  # (n, H, W) bool each -> (B, N, H, W), False for padding
        masks = samples[0]["reference_masks"]
        batch["reference_masks"] = masks.new_zeros(len(samples), most, *masks.shape[1:])
        for i, s in enumerate(samples):
            batch["reference_masks"][i, : counts[i]] = s["reference_masks"]
    for key in samples[0]:
        if key in ("references", "reference_masks"):
            continue
        values = [s[key] for s in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def to_model_batch(batch: dict) -> dict:
    """The loader's uint8 batch as the float batch of :mod:`bindweave.model.batch`, on the batch's device.

    ``frames`` (B, F, H, W, 3) uint8 becomes ``video`` (B, 3, F, H, W) in [-1, 1]; ``references``
    become floats with zero padding. A cached batch gets a zero ``references`` of the clip size
    that takes no memory (an expanded scalar): its features were encoded from the real ones, and
    the model only reads the shape (masks and size checks).
    """
    if "frames" in batch:
        frames = batch.pop("frames")  # (B, F, H, W, 3)
        video = frames.permute(0, 4, 1, 2, 3).to(torch.float32, memory_format=torch.contiguous_format)  # (B, 3, F, H, W)
        batch["video"] = video.div_(127.5).sub_(1.0)
    refs = batch.get("references")
    if refs is not None and refs.dtype == torch.uint8:
        refs = refs.float().div_(127.5).sub_(1.0)  # (B, N, 3, H, W)
        present = count_mask(batch["num_references"], refs.shape[1], refs.device)  # (B, N), no sync
        batch["references"] = refs.mul_(present[:, :, None, None, None])  # padding slots 0: one kernel, not one per sample
    if refs is None and "video_latents" in batch:
        latents = batch["video_latents"]
        shape = (latents.shape[0], max(batch["num_references"]), 3, batch["height"][0], batch["width"][0])
        batch["references"] = latents.new_zeros(()).expand(shape)  # (B, N, 3, H, W), no memory
    return batch
