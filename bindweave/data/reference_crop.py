"""Reference preprocessing: crop each image to its subject, pad it to a square, resize it.

A reference shows its subject at any scale and offset (the sprites references: 45–90 % of the
image at a random place), while the video shows it at one size. A reader that sees the subject
cropped and resized to a fixed size recovers its shape and pattern far more easily (issue #21:
a small reader's shape accuracy 0.76 from the raw pixels, 1.00 from the crop).

The subject is what differs from the background by more than ``threshold`` in some channel; the
background is ``fill`` (white for references on white, images with alpha composited on white by
:func:`bindweave.model.batch.to_rgb`). Batched, device-agnostic torch: the same function runs in
training (on the GPU) and in ``predict``; the same input gives the same crop on any device up to
the interpolation's rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def subject_boxes(images: torch.Tensor, fill: float = 1.0, threshold: float = 0.1) -> torch.Tensor:
    """Bounding box of the pixels that are not background, per image.

    Args:
        images: (M, 3, H, W) in [-1, 1].
        fill: background value in [-1, 1] (1.0: white).
        threshold: how far from ``fill`` (any channel) a pixel must be to count as subject.

    Returns:
        (M, 4) float ``[x0, y0, x1, y1)`` in pixels; an image with no subject pixel gets the whole image.
    """
    h, w = images.shape[-2:]
    subject = ((images - fill).abs() > threshold).any(dim=1)  # (M, H, W)
    rows, cols = subject.any(dim=2), subject.any(dim=1)  # (M, H), (M, W)
    ys = torch.arange(h, device=images.device)
    xs = torch.arange(w, device=images.device)
    big = max(h, w) + 1  # a Python scalar: a device tensor made from it would be a host copy, a sync
    y0 = torch.where(rows, ys, big).amin(dim=1)  # (M,)
    y1 = torch.where(rows, ys, -1).amax(dim=1) + 1
    x0 = torch.where(cols, xs, big).amin(dim=1)
    x1 = torch.where(cols, xs, -1).amax(dim=1) + 1
    empty = ~rows.any(dim=1)  # (M,): the whole image [0, 0, w, h) instead
    # Python scalars, as `big` above: setting elements of a CUDA tensor (`whole[2] = w`) is a host
    # copy, a sync (it stalled every training step of the sprites reader on an H100).
    corners = [torch.where(empty, value, edge) for value, edge in ((0, x0), (0, y0), (w, x1), (h, y1))]
    return torch.stack(corners, dim=1).float()  # (M, 4)


def crop_to_subject(images: torch.Tensor, size: int, fill: float = 1.0, threshold: float = 0.1,
                    margin: float = 0.0, supersample: int = 4) -> torch.Tensor:
    """Each image cropped to its subject's box, padded to a square with ``fill`` (centred), and
    resized to ``size`` × ``size`` (bilinear, area-averaged when shrinking).

    Args:
        images: (M, 3, H, W) in [-1, 1].
        size: side of the output.
        fill: background value (see :func:`subject_boxes`), also the padding.
        threshold: see :func:`subject_boxes`.
        margin: extra room around the box, as a fraction of its longer side.
        supersample: the square is sampled bilinearly at ``size * supersample`` per side, then
            averaged down: an area resize that keeps thin stripes of a large reference.

    Returns:
        (M, 3, size, size) in [-1, 1].
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"crop_to_subject takes (M, 3, H, W) images, got {tuple(images.shape)}.")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}.")
    m, _, h, w = images.shape
    if m == 0:
        return images.new_zeros(0, 3, size, size)
    box = subject_boxes(images.float(), fill, threshold)  # (M, 4)
    centre_x, centre_y = (box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2  # (M,)
    side = torch.maximum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]) * (1 + 2 * margin)  # (M,) square side
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}.")
    factor = supersample
    fine = size * factor
    offsets = (torch.arange(fine, device=images.device, dtype=torch.float32) + 0.5) / fine - 0.5  # (fine,)
    xs = centre_x[:, None] + offsets[None] * side[:, None]  # (M, fine) pixel coordinates
    ys = centre_y[:, None] + offsets[None] * side[:, None]
    grid = torch.stack([  # grid_sample's [-1, 1] over pixel edges (align_corners=False)
        (xs[:, None, :] * 2 / w - 1).expand(m, fine, fine),
        (ys[:, :, None] * 2 / h - 1).expand(m, fine, fine),
    ], dim=-1)  # (M, fine, fine, 2)
    padded = images.float() - fill  # background 0, so zero padding outside the image is the fill
    sampled = F.grid_sample(padded, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (M, 3, fine, fine)
    if factor > 1:
        sampled = F.avg_pool2d(sampled, factor)  # (M, 3, size, size)
    return (sampled + fill).to(images.dtype)


def crop_onto_canvas(images: torch.Tensor, size: int, fill: float = 1.0, threshold: float = 0.1) -> torch.Tensor:
    """Each image's subject cropped and resized to ``size`` (:func:`crop_to_subject`), centred on a
    ``fill`` canvas of the images' own size: the subject at one known scale, wherever and however
    large the reference showed it.

    Args:
        images: (M, 3, H, W) in [-1, 1].
        size: side of the subject's square on the canvas (<= H and W).

    Returns:
        (M, 3, H, W) in [-1, 1].
    """
    h, w = images.shape[-2:]
    if not 1 <= size <= min(h, w):
        raise ValueError(f"crop size must be in 1..{min(h, w)} (the canvas), got {size}.")
    crops = crop_to_subject(images, size, fill, threshold)  # (M, 3, size, size)
    top, left = (h - size) // 2, (w - size) // 2
    return F.pad(crops - fill, (left, w - size - left, top, h - size - top)) + fill  # (M, 3, H, W)
