"""Multi-crop augmentation of DINO / EsViT pretraining.

Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments"
(SwAV, NeurIPS 2020) introduced multi-crop; DINO (ICCV 2021, appendix) and EsViT
(arXiv:2106.09785) use it with the BYOL colour recipe: from one image, two global crops
(224 px, 40-100 % of the area) and N local crops (96 px, 5-40 %), each randomly flipped,
colour-jittered (p 0.8), turned grey (p 0.2) and Gaussian-blurred (p 1.0 for the first global
crop, 0.1 for the second, 0.5 for the local ones); the second global crop is also solarised
(p 0.2). The teacher sees the global crops, the student all of them.

Randomness and seeding: every random decision draws from torch's global CPU generator (the
torchvision transforms already do; blur and solarisation here do too, so no `random` / numpy
state is involved). Inside a `DataLoader`, each worker's torch generator is seeded with
`base_seed + worker_id`, where `base_seed` is drawn once per epoch from the loader's
`generator=` argument (or the global generator): fixing that makes a run reproducible for a given
`num_workers`, but a sample's crops still depend on which worker handles it. For crops that
depend only on the sample, pass `seed=` to `__call__` (e.g. derived from the epoch and the sample
index); the call then runs on a private generator state and leaves the ambient one untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from ..images import IMAGENET_MEAN, IMAGENET_STD
from .arguments import DataArguments, pair


class RandomGaussianBlur:
    """PIL Gaussian blur with probability `p` and a radius uniform in `[radius_min, radius_max]`."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.p <= 0 or torch.rand(()).item() >= self.p:
            return image
        radius = self.radius_min + (self.radius_max - self.radius_min) * torch.rand(()).item()
        return image.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, radius=({self.radius_min}, {self.radius_max}))"


class RandomSolarize:
    """PIL solarisation (invert pixels >= `threshold`) with probability `p`."""

    def __init__(self, p: float, threshold: int = 128):
        self.p, self.threshold = p, threshold

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.p <= 0 or torch.rand(()).item() >= self.p:
            return image
        return ImageOps.solarize(image, threshold=self.threshold)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, threshold={self.threshold})"


def _as_tuple(value: int | Sequence[int], name: str) -> tuple[int, ...]:
    values = (value,) if isinstance(value, int) else tuple(value)
    if any((not isinstance(v, int)) or v < 0 for v in values):
        raise ValueError(f"{name} must be non-negative integers, got {value!r}")
    return values


class SeededCrops:
    """What both multi-crop callables share (`MultiCropAugmentation` and the crop-only half of
    `device_augment`): the layout of the crops and the seeded call.

    Subclasses set `global_crop_size`, `num_local_crops`, `local_crop_sizes`, `convert_to_rgb` and
    define `_crops(image) -> list[Tensor]`.
    """

    global_crop_size: int
    num_local_crops: tuple[int, ...]
    local_crop_sizes: tuple[int, ...]
    convert_to_rgb: bool

    @property
    def num_crops(self) -> int:
        return 2 + sum(self.num_local_crops)

    @property
    def crop_sizes(self) -> list[int]:
        """Side of every returned crop, in order."""
        sizes = [self.global_crop_size] * 2
        for count, size in zip(self.num_local_crops, self.local_crop_sizes):
            sizes += [size] * count
        return sizes

    def _crops(self, image: Image.Image) -> list[torch.Tensor]:
        raise NotImplementedError

    def _prepare(self, image: Image.Image) -> Image.Image:
        if not isinstance(image, Image.Image):
            raise TypeError(f"{type(self).__name__} expects a PIL image, got {type(image).__name__}")
        if self.convert_to_rgb and image.mode != "RGB":
            image = image.convert("RGB")
        return image

    def __call__(self, image: Image.Image, seed: int | None = None) -> list[torch.Tensor]:
        """All crops of one image. With `seed`, the result depends only on (image, seed)."""
        image = self._prepare(image)
        if seed is None:
            return self._crops(image)
        with torch.random.fork_rng(devices=[]):
            # Seed only the CPU generator: `torch.manual_seed` also visits the accelerator
            # generators, which costs milliseconds per call (once per image here).
            torch.random.default_generator.manual_seed(seed)
            return self._crops(image)


class MultiCropAugmentation(SeededCrops):
    """PIL image -> `[global_1, global_2, local_1, ..., local_N]` normalised `[C, H, W]` tensors.

    Args:
        global_crop_size: side of the two global crops (224; e.g. 32 for 32-px images).
        global_crops_scale: area fraction range of the global crops.
        num_local_crops: number of local crops, or one count per entry of `local_crop_size`.
        local_crop_size: side of the local crops (96), or several sizes; crops come grouped by size.
        local_crops_scale: area fraction range of the local crops.
        flip_prob, color_jitter (brightness, contrast, saturation, hue), color_jitter_prob,
        grayscale_prob: the shared photometric recipe.
        blur_probs: blur probability of (first global, second global, local) crops; zeros turn
            blurring off (sensible for tiny images).
        blur_radius: range of the PIL Gaussian blur radius.
        solarize_prob: solarisation probability of the second global crop.
        mean, std: normalisation; ImageNet statistics by default.
        convert_to_rgb: convert other modes (e.g. greyscale "L") to RGB first, so that every crop
            has 3 channels.

    Example:
        >>> aug = MultiCropAugmentation(global_crop_size=32, local_crop_size=16, num_local_crops=4,
        ...                             blur_probs=(0.0, 0.0, 0.0))
        >>> crops = aug(Image.new("RGB", (40, 40)), seed=0)
        >>> [tuple(c.shape) for c in crops][:3]
        [(3, 32, 32), (3, 32, 32), (3, 16, 16)]
    """

    def __init__(
        self,
        global_crop_size: int = 224,
        global_crops_scale: tuple[float, float] = (0.4, 1.0),
        num_local_crops: int | Sequence[int] = 8,
        local_crop_size: int | Sequence[int] = 96,
        local_crops_scale: tuple[float, float] = (0.05, 0.4),
        flip_prob: float = 0.5,
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        color_jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5),
        blur_radius: tuple[float, float] = (0.1, 2.0),
        solarize_prob: float = 0.2,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: InterpolationMode = InterpolationMode.BICUBIC,
        convert_to_rgb: bool = True,
    ):
        counts = _as_tuple(num_local_crops, "num_local_crops")
        sizes = _as_tuple(local_crop_size, "local_crop_size")
        if len(counts) != len(sizes):
            raise ValueError(f"num_local_crops {counts} and local_crop_size {sizes} must have the same length")
        if len(blur_probs) != 3:
            raise ValueError(f"blur_probs needs 3 probabilities (global 1, global 2, local), got {blur_probs}")
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have the same length, got {len(mean)} and {len(std)}")
        self.global_crop_size = global_crop_size
        self.num_local_crops = counts
        self.local_crop_sizes = sizes
        self.convert_to_rgb = convert_to_rgb
        # The constructor arguments, split into the geometric and the photometric half, so that
        # `device_augment.device_recipe_from` can build the same recipe in two stages.
        self.crop_arguments = dict(
            global_crop_size=global_crop_size,
            global_crops_scale=tuple(global_crops_scale),
            num_local_crops=counts,
            local_crop_size=sizes,
            local_crops_scale=tuple(local_crops_scale),
            interpolation=interpolation,
            convert_to_rgb=convert_to_rgb,
        )
        self.photometric_arguments = dict(
            flip_prob=flip_prob,
            color_jitter=tuple(color_jitter),
            color_jitter_prob=color_jitter_prob,
            grayscale_prob=grayscale_prob,
            blur_probs=tuple(blur_probs),
            blur_radius=tuple(blur_radius),
            solarize_prob=solarize_prob,
            mean=tuple(mean),
            std=tuple(std),
        )

        brightness, contrast, saturation, hue = color_jitter
        photometric = [
            transforms.RandomHorizontalFlip(p=flip_prob),
            transforms.RandomApply(
                [transforms.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)],
                p=color_jitter_prob,
            ),
            transforms.RandomGrayscale(p=grayscale_prob),
        ]
        to_tensor = [transforms.ToTensor(), transforms.Normalize(tuple(mean), tuple(std))]

        def crop(size: int, scale: tuple[float, float]) -> transforms.RandomResizedCrop:
            return transforms.RandomResizedCrop(size, scale=tuple(scale), interpolation=interpolation)

        blur_g1, blur_g2, blur_local = (RandomGaussianBlur(p, *blur_radius) for p in blur_probs)
        self.global_transform_1 = transforms.Compose(
            [crop(global_crop_size, global_crops_scale), *photometric, blur_g1, *to_tensor]
        )
        self.global_transform_2 = transforms.Compose(
            [
                crop(global_crop_size, global_crops_scale),
                *photometric,
                blur_g2,
                RandomSolarize(solarize_prob),
                *to_tensor,
            ]
        )
        self.local_transforms = [
            transforms.Compose([crop(size, local_crops_scale), *photometric, blur_local, *to_tensor]) for size in sizes
        ]

    def _crops(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self.global_transform_1(image), self.global_transform_2(image)]
        for count, transform in zip(self.num_local_crops, self.local_transforms):
            crops.extend(transform(image) for _ in range(count))
        return crops

    def __repr__(self) -> str:
        lines = [
            f"{type(self).__name__}(",
            f"  global_1={self.global_transform_1},",
            f"  global_2={self.global_transform_2},",
        ]
        for count, transform in zip(self.num_local_crops, self.local_transforms):
            lines.append(f"  {count} x local={transform},")
        return "\n".join(lines) + "\n)"


def build_augmentation(args: DataArguments) -> MultiCropAugmentation:
    """The multi-crop augmentation described by `args` (2 global + `num_local_crops` local crops)."""
    return MultiCropAugmentation(
        global_crop_size=args.global_crop_size,
        global_crops_scale=pair(args.global_crops_scale, "global_crops_scale"),
        num_local_crops=args.num_local_crops,
        local_crop_size=args.local_crop_size,
        local_crops_scale=pair(args.local_crops_scale, "local_crops_scale"),
        blur_probs=tuple(args.blur_probs),
    )


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiCropAugmentation",
    "RandomGaussianBlur",
    "RandomSolarize",
    "SeededCrops",
    "build_augmentation",
]
