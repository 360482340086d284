"""Random resized crops of a batch of images on its own device, one box per image.

The geometric half of multi-crop (SwAV / DINO / EsViT: `RandomResizedCrop` with an area fraction
drawn from `scale` and an aspect ratio log-uniform in `ratio`) for images that already sit on the
accelerator, e.g. a small dataset held in GPU memory: no DataLoader worker, no host copy. Each image
gets its own box, drawn like torchvision's `RandomResizedCrop.get_params` (up to 10 tries for a box
that fits, else the largest centred box of an allowed aspect ratio), and is resampled bilinearly
with `grid_sample` (torchvision's CPU recipe resamples bicubically with antialiasing; for small
images that are mostly enlarged by the crop the difference is minor).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sample_crop_boxes(
    batch_size: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    attempts: int = 10,
) -> torch.Tensor:
    """`[B, 4]` boxes `(left, top, box_width, box_height)` in pixels (integers, as float32)."""
    area = height * width
    shape = (batch_size, attempts)
    fraction = torch.empty(shape, device=device).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(shape, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()
    w = torch.sqrt(fraction * area * aspect).round()  # [B, attempts]
    h = torch.sqrt(fraction * area / aspect).round()
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(fits, torch.arange(attempts, device=device), attempts).amin(dim=1)  # [B]
    found = first < attempts
    pick = first.clamp_max(attempts - 1)[:, None]
    w, h = w.gather(1, pick)[:, 0], h.gather(1, pick)[:, 0]  # [B]
    # the fallback after `attempts` misses: the whole image, cut to the nearest allowed aspect ratio
    image_ratio = width / height
    if image_ratio < ratio[0]:
        fallback_w, fallback_h = width, round(width / ratio[0])
    elif image_ratio > ratio[1]:
        fallback_w, fallback_h = round(height * ratio[1]), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(found, w, torch.full_like(w, fallback_w))
    h = torch.where(found, h, torch.full_like(h, fallback_h))
    # top-left corner uniform over the valid integer positions (centred for the fallback)
    u = torch.rand((batch_size, 2), device=device, generator=generator)
    left = torch.where(found, torch.floor(u[:, 0] * (width - w + 1)), torch.floor((width - w) / 2))
    top = torch.where(found, torch.floor(u[:, 1] * (height - h + 1)), torch.floor((height - h) / 2))
    return torch.stack([left, top, w, h], dim=1)


def crop_and_resize(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Resample `boxes` (`[B, 4]`, as `sample_crop_boxes`) of `images` `[B, C, H, W]` (float) to
    `[B, C, size, size]`, bilinearly, with pixel centres aligned as `interpolate(align_corners=False)`."""
    _, _, height, width = images.shape
    left, top, w, h = boxes.to(images.dtype).unbind(dim=1)  # [B] each
    theta = torch.zeros(images.shape[0], 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = w / width  # half-extent of the box in normalised coordinates
    theta[:, 0, 2] = (2 * left + w) / width - 1  # centre of the box
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crops(
    images: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One random resized crop per image: `[B, C, H, W]` float -> `[B, C, size, size]`."""
    boxes = sample_crop_boxes(images.shape[0], images.shape[2], images.shape[3], scale, ratio, generator, images.device)
    return crop_and_resize(images, boxes, size)


__all__ = ["crop_and_resize", "random_resized_crops", "sample_crop_boxes"]
