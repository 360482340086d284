"""MultiCropAugmentation: crop layout, the per-crop recipe, normalisation and seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from esvit.images import IMAGENET_MEAN, IMAGENET_STD
from esvit.training.multicrop import MultiCropAugmentation

NO_PHOTOMETRY = dict(
    flip_prob=0.0, color_jitter_prob=0.0, grayscale_prob=0.0, blur_probs=(0.0, 0.0, 0.0), solarize_prob=0.0
)


def noise_image(size: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_default_recipe_layout():
    aug = MultiCropAugmentation()
    crops = aug(noise_image(256), seed=0)
    assert len(crops) == aug.num_crops == 10
    assert [c.shape[-1] for c in crops] == aug.crop_sizes == [224] * 2 + [96] * 8
    assert all(c.shape[0] == 3 and c.dtype == torch.float32 for c in crops)


def test_small_image_recipe_and_several_local_sizes():
    aug = MultiCropAugmentation(
        global_crop_size=32, num_local_crops=(2, 3), local_crop_size=(16, 8), blur_probs=(0.0, 0.0, 0.0)
    )
    crops = aug(noise_image(), seed=1)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2 + [(3, 8, 8)] * 3


def test_seed_makes_crops_reproducible_and_leaves_global_rng_alone():
    aug = MultiCropAugmentation(global_crop_size=32, local_crop_size=16, num_local_crops=2)
    image = noise_image()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, second, other = aug(image, seed=7), aug(image, seed=7), aug(image, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    # Without a seed the ambient torch generator drives the crops (what DataLoader workers seed).
    torch.manual_seed(5)
    unseeded = aug(image)
    torch.manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(unseeded, aug(image)))


def test_normalisation_and_solarisation_of_the_second_global_crop_only():
    # A constant image makes every geometric choice irrelevant; only solarisation changes a value.
    aug = MultiCropAugmentation(
        global_crop_size=8, local_crop_size=4, num_local_crops=1, **{**NO_PHOTOMETRY, "solarize_prob": 1.0}
    )
    g1, g2, local = aug(Image.new("RGB", (20, 20), (200, 200, 200)), seed=0)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(g1, ((200 / 255 - mean) / std).expand_as(g1))
    torch.testing.assert_close(local, ((200 / 255 - mean) / std).expand_as(local))
    torch.testing.assert_close(g2, ((55 / 255 - mean) / std).expand_as(g2))


def test_blur_probabilities_apply_per_crop_kind():
    image = noise_image(16)
    only_first = MultiCropAugmentation(
        global_crop_size=16,
        global_crops_scale=(1.0, 1.0),
        local_crop_size=16,
        local_crops_scale=(1.0, 1.0),
        num_local_crops=1,
        **{**NO_PHOTOMETRY, "blur_probs": (1.0, 0.0, 0.0)},
    )
    g1, g2, local = only_first(image, seed=0)
    assert torch.equal(g2, local)  # full-image crops without any photometric change
    assert g1.std() < g2.std()  # the blurred one is smoother


def test_greyscale_input_becomes_three_channels_and_bad_arguments_fail():
    aug = MultiCropAugmentation(global_crop_size=16, local_crop_size=8, num_local_crops=1, blur_probs=(0.0, 0.0, 0.0))
    crops = aug(Image.new("L", (28, 28), 90), seed=0)
    assert all(c.shape[0] == 3 for c in crops)
    with pytest.raises(TypeError, match="PIL image"):
        aug(torch.zeros(3, 28, 28))
    with pytest.raises(ValueError, match="same length"):
        MultiCropAugmentation(num_local_crops=(2, 2), local_crop_size=96)
    with pytest.raises(ValueError, match="blur_probs"):
        MultiCropAugmentation(blur_probs=(1.0, 0.5))
