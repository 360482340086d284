"""Random resized crops on the device: the box distribution of torchvision's RandomResizedCrop,
and a resampling that cuts out exactly the box."""

from __future__ import annotations

import math

import torch
from torchvision import transforms

from esvit.training.device_crops import crop_and_resize, random_resized_crops, sample_crop_boxes


def test_boxes_follow_the_random_resized_crop_distribution():
    n, height, width, scale = 20000, 28, 28, (0.25, 1.0)
    boxes = sample_crop_boxes(n, height, width, scale, generator=torch.Generator().manual_seed(0))
    left, top, w, h = boxes.unbind(1)
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= width).all() and (top + h <= height).all()
    assert torch.equal(boxes, boxes.round())
    torch.manual_seed(0)
    image = torch.empty(1, height, width)
    ref = torch.tensor(
        [transforms.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(n)]
    ).float()  # rows (top, left, h, w)
    ref_top, ref_left, ref_h, ref_w = ref.unbind(1)
    pairs = [
        (w * h / (height * width), ref_w * ref_h / (height * width)),  # area fraction
        (w / h, ref_w / ref_h),  # aspect ratio
        (left / (width - w + 1), ref_left / (width - ref_w + 1)),  # relative position
    ]
    for ours, theirs in pairs:
        # means and spreads agree within a few standard errors of 20k draws
        tolerance = 5 * theirs.std() / math.sqrt(n)
        assert abs(ours.mean() - theirs.mean()) < tolerance, (ours.mean(), theirs.mean())
        assert abs(ours.std() - theirs.std()) < 0.05 * theirs.std()
    whole = sample_crop_boxes(8, 28, 28, (0.999, 1.0), ratio=(2.0, 3.0))  # never fits: the fallback
    assert torch.equal(whole[:, 2], torch.full((8,), 28.0)) and torch.equal(whole[:, 3], torch.full((8,), 14.0))


def test_the_resampling_cuts_out_exactly_the_box():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    boxes = torch.tensor([[2.0, 1.0, 4.0, 4.0], [0.0, 0.0, 8.0, 8.0]])  # (left, top, w, h)
    out = crop_and_resize(images, boxes, size=4)
    torch.testing.assert_close(out[0], images[0, :, 1:5, 2:6])  # same size: the pixels themselves
    torch.testing.assert_close(out[1], torch.nn.functional.interpolate(images[1:], size=4, mode="bilinear")[0])
    crops = random_resized_crops(images, 6, (0.3, 1.0), generator=torch.Generator().manual_seed(1))
    assert crops.shape == (2, 3, 6, 6)
    again = random_resized_crops(images, 6, (0.3, 1.0), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(crops, again, rtol=0, atol=0)
