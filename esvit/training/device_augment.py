"""Multi-crop augmentation in two halves: crops on the CPU, photometric changes batched on the device.

The recipe is the one of `multicrop.MultiCropAugmentation`: DINO (Caron et al., "Emerging
Properties in Self-Supervised Vision Transformers", ICCV 2021) multi-crop with the BYOL colour
recipe (Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020): every crop is flipped (p 0.5),
colour-jittered (p 0.8; brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in a random order),
turned grey (p 0.2), Gaussian-blurred (p 1.0 / 0.1 / 0.5 for the first global, second global and
local crops, sigma uniform in [0.1, 2.0]) and, for the second global crop only, solarised (p 0.2),
then normalised. Here it is split in two:

* `CropOnlyMultiCrop` (DataLoader workers): PIL image -> the random resized crops as uint8
  `[3, h, w]` tensors, with the sizes, order and seeding of `MultiCropAugmentation` and no
  photometric PIL operation at all;
* `DevicePhotometricAugmentation` (training step, on the accelerator): uint8 `[B, 3, h, w]` crops
  -> normalised float32 crops, every random decision drawn per sample (`[B]` tensors), unlike
  batch transforms that draw one parameter set per call and would give every image of a batch
  the same colours.

The device operations follow torchvision's functional ops on float images in [0, 1] (blend with
zeros / the mean grey level / the grey image for brightness / contrast / saturation, a hue shift in
HSV, clamping after each op, the 0.2989 / 0.587 / 0.114 luma weights of its tensor kernels, a true
Gaussian with reflect padding); the CPU recipe runs the PIL versions, which round to uint8 after
every op, use 0.299 for red and approximate the Gaussian by box blurs, so the two agree in
distribution, not pixel for pixel.

    crop, photometric = device_recipe_from(MultiCropAugmentation(...))
    # worker: crops = crop(image, seed=...)              -> n_crops x uint8 [3, h, w]
    # step:   views = photometric(batch_crops, generator) -> n_crops x float32 [B, 3, h, w]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from ..images import IMAGENET_MEAN, IMAGENET_STD
from .multicrop import MultiCropAugmentation, SeededCrops, _as_tuple

#: Luma weights of torchvision's tensor `rgb_to_grayscale` (ITU-R 601-2, red rounded as there).
LUMA_WEIGHTS = (0.2989, 0.587, 0.114)

#: Index of each colour-jitter operation in `PhotometricParameters.order`.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3

#: Columns of the uniform draws of `DevicePhotometricAugmentation.sample_parameters`, one row per sample.
_FLIP, _JITTER, _GRAY, _BLUR, _SOLARIZE, _SIGMA, _FACTORS, _ORDER, _NUM_DRAWS = 0, 1, 2, 3, 4, 5, 6, 10, 14


# ---------------------------------------------------------------------------------- CPU half
class CropOnlyMultiCrop(SeededCrops):
    """PIL image -> `[global_1, global_2, local_1, ..., local_N]` uint8 `[3, h, w]` crops.

    The geometric half of `MultiCropAugmentation` (same arguments, crop sizes and order, random
    resized crops drawn from torch's CPU generator, `seed=` for a private generator state); the
    rest of the recipe runs batched on the device (`DevicePhotometricAugmentation`). Boxes are
    drawn in the same order as there, but `MultiCropAugmentation` also draws its photometric
    decisions between two crops, so with the same seed only the first box is the same one.
    JPEG draft decoding (`Image.draft`) belongs before this step, at decoding time
    (`images.decode_image(min_side=...)`): the image given here is already decoded.
    """

    def __init__(
        self,
        global_crop_size: int = 224,
        global_crops_scale: tuple[float, float] = (0.4, 1.0),
        num_local_crops: int | Sequence[int] = 8,
        local_crop_size: int | Sequence[int] = 96,
        local_crops_scale: tuple[float, float] = (0.05, 0.4),
        interpolation: InterpolationMode = InterpolationMode.BICUBIC,
        convert_to_rgb: bool = True,
    ):
        counts = _as_tuple(num_local_crops, "num_local_crops")
        sizes = _as_tuple(local_crop_size, "local_crop_size")
        if len(counts) != len(sizes):
            raise ValueError(f"num_local_crops {counts} and local_crop_size {sizes} must have the same length")
        self.global_crop_size = global_crop_size
        self.num_local_crops = counts
        self.local_crop_sizes = sizes
        self.convert_to_rgb = convert_to_rgb
        self.global_crop = transforms.RandomResizedCrop(
            global_crop_size, scale=tuple(global_crops_scale), interpolation=interpolation
        )
        self.local_crops = [
            transforms.RandomResizedCrop(size, scale=tuple(local_crops_scale), interpolation=interpolation)
            for size in sizes
        ]

    @classmethod
    def from_multicrop(cls, augmentation: MultiCropAugmentation) -> CropOnlyMultiCrop:
        """The crops of `augmentation` (its `crop_arguments`)."""
        return cls(**augmentation.crop_arguments)

    @staticmethod
    def _to_uint8(image: Image.Image) -> torch.Tensor:
        # [h, w, 3] uint8 array (a writable copy, which torch may share) -> [3, h, w] view
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)

    def _crops(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self._to_uint8(self.global_crop(image)), self._to_uint8(self.global_crop(image))]
        for count, crop in zip(self.num_local_crops, self.local_crops):
            crops.extend(self._to_uint8(crop(image)) for _ in range(count))
        return crops

    def _prepare(self, image: Image.Image) -> Image.Image:
        image = super()._prepare(image)
        if image.mode != "RGB":
            raise ValueError(f"CropOnlyMultiCrop needs an RGB image, got mode {image.mode!r}")
        return image

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}(", f"  2 x global={self.global_crop},"]
        for count, crop in zip(self.num_local_crops, self.local_crops):
            lines.append(f"  {count} x local={crop},")
        return "\n".join(lines) + "\n)"


# ------------------------------------------------------------------------- batched operations
# Every function takes float images `[B, 3, h, w]` in [0, 1] and per-sample values `[B]`.
def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """`[B]` -> `[B, 1, 1, 1]`, to broadcast over an image batch."""
    return values.reshape(-1, 1, 1, 1)


def rgb_to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """`[B, 3, h, w]` -> luma `[B, 1, h, w]`."""
    red, green, blue = images.unbind(dim=1)
    return (red * LUMA_WEIGHTS[0] + green * LUMA_WEIGHTS[1] + blue * LUMA_WEIGHTS[2]).unsqueeze(1)


def _blend(images: torch.Tensor, reference: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """`factor * images + (1 - factor) * reference`, clamped to [0, 1]; `factor` is `[B, 1, 1, 1]`."""
    return (images * factor + reference * (1.0 - factor)).clamp_(0.0, 1.0)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with black: `factor` 0 gives black, 1 the image."""
    return _blend(images, images.new_zeros(()), _per_sample(factor))


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean grey level: `factor` 0 gives a uniform grey image."""
    mean = rgb_to_grayscale(images).mean(dim=(1, 2, 3), keepdim=True)  # [B, 1, 1, 1]
    return _blend(images, mean, _per_sample(factor))


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the grey image: `factor` 0 gives the grey image, 2 doubles the saturation."""
    return _blend(images, rgb_to_grayscale(images), _per_sample(factor))


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `shift` turns (in [-0.5, 0.5]), keeping the HSV saturation and value.

    With V = max(r, g, b), C = V - min(r, g, b) (= V * S) and H6 = 6 * hue in [0, 6), channel
    n in (r: 5, g: 3, b: 1) of the HSV -> RGB map is `V - C * clamp(min(k, 4 - k), 0, 1)` with
    `k = (n + H6) mod 6`; the shifted hue enters as `H6 + 6 * shift`.
    """
    red, green, blue = images.unbind(dim=1)  # [B, h, w] each
    minimum, maximum = torch.aminmax(images, dim=1)  # [B, h, w]
    chroma = maximum - minimum
    # A grey pixel (chroma 0) has no hue; any finite value does, as C = 0 erases it below.
    divisor = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue6 = torch.where(
        maximum == red,
        (green - blue) / divisor,
        torch.where(maximum == green, (blue - red) / divisor + 2.0, (red - green) / divisor + 4.0),
    )  # [B, h, w], 6 * hue up to a multiple of 6
    hue6 = hue6 + 6.0 * shift.reshape(-1, 1, 1)
    offsets = torch.arange(5, 0, -2, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)  # r, g, b: 5, 3, 1
    k = torch.remainder(offsets + hue6.unsqueeze(1), 6.0)  # [B, 3, h, w]
    weight = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return maximum.unsqueeze(1) - chroma.unsqueeze(1) * weight


def gaussian_kernel_size(sigma_max: float) -> int:
    """Odd kernel side covering +-3 standard deviations: `2 * ceil(3 * sigma_max) + 1`."""
    return 2 * math.ceil(3.0 * sigma_max) + 1


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-sample Gaussian blur of standard deviation `sigma` `[B]`, `kernel_size` odd, reflect padding.

    Separable: one horizontal and one vertical 1-D convolution, each a grouped `conv2d` with one
    group per (sample, channel), so every sample uses its own kernel.
    """
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    batch, channels, height, width = images.shape
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, device=images.device, dtype=images.dtype)  # [K]
    sigma = sigma.to(images.dtype).clamp_min(1e-6).reshape(-1, 1)  # [B, 1]
    kernels = torch.exp(-0.5 * (offsets / sigma) ** 2)  # [B, K]
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # [B*C, K]
    groups = batch * channels
    padded = F.pad(images, (half, half, half, half), mode="reflect")  # [B, C, h+2p, w+2p]
    padded = padded.reshape(1, groups, height + 2 * half, width + 2 * half)
    rows = F.conv2d(padded, kernels.view(groups, 1, 1, kernel_size), groups=groups)  # [1, B*C, h+2p, w]
    blurred = F.conv2d(rows, kernels.view(groups, 1, kernel_size, 1), groups=groups)  # [1, B*C, h, w]
    return blurred.view(batch, channels, height, width)


def solarize(images: torch.Tensor, threshold: float = 128 / 255) -> torch.Tensor:
    """Invert every value `>= threshold`."""
    return torch.where(images >= threshold, 1.0 - images, images)


# ------------------------------------------------------------------------------- device half
@dataclass
class PhotometricParameters:
    """The random decisions of one batch of crops, one row per sample.

    None: the operation is off for the whole batch (probability or strength 0), which also skips
    its computation.

    Attributes:
        flip: `[B]` bool, mirror left-right.
        jitter: `[B]` bool, apply the colour jitter.
        brightness, contrast, saturation: `[B]` float blend factors; hue: `[B]` float shift in turns.
        order: `[B, 4]` int64; `order[i, j]` is the jitter operation (BRIGHTNESS, CONTRAST,
            SATURATION, HUE) applied j-th to sample i.
        grayscale: `[B]` bool.
        blur: `[B]` bool; sigma: `[B]` float, the blur's standard deviation in pixels.
        solarize: `[B]` bool.
    """

    flip: torch.Tensor | None = None
    jitter: torch.Tensor | None = None
    brightness: torch.Tensor | None = None
    contrast: torch.Tensor | None = None
    saturation: torch.Tensor | None = None
    hue: torch.Tensor | None = None
    order: torch.Tensor | None = None
    grayscale: torch.Tensor | None = None
    blur: torch.Tensor | None = None
    sigma: torch.Tensor | None = None
    solarize: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> PhotometricParameters:
        """The same parameters on `device`."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return PhotometricParameters(**{k: None if v is None else v.to(device) for k, v in moved.items()})


def _factor_range(strength: float, name: str) -> tuple[float, float] | None:
    """torchvision's ColorJitter range of one strength: `[max(0, 1 - s), 1 + s]`, hue `[-s, s]`; None for 0."""
    if strength < 0:
        raise ValueError(f"{name} jitter must be non-negative, got {strength}")
    if strength == 0:
        return None
    return (-strength, strength) if name == "hue" else (max(0.0, 1.0 - strength), 1.0 + strength)


class DevicePhotometricAugmentation(torch.nn.Module):
    """uint8 crops `n_crops x [B, 3, h, w]` -> augmented, normalised float32 crops of the same shapes.

    The photometric half of `MultiCropAugmentation`, batched, with every decision drawn per sample.
    Crop 0 is the first global crop (blur probability `blur_probs[0]`), crop 1 the second
    (`blur_probs[1]` and solarisation), crops >= 2 the local ones (`blur_probs[2]`). It holds no
    parameters; the normalisation constants are non-persistent buffers, moved along with the
    module and otherwise copied to the crops' device. Nothing waits on the device: no value is read
    back to the host, and the blur kernel size is fixed by `blur_radius[1]`.

    Cost: the jitter ops run at each of their four possible positions over the whole batch and are
    kept where a sample's drawn order puts them (masks, no per-sample loop), so the hue shift (the
    costliest op) is computed four times; blurs and the other ops are computed for the whole batch
    and kept where drawn.

    Args:
        flip_prob: probability of a horizontal flip.
        color_jitter: (brightness, contrast, saturation, hue) strengths; factors are uniform in
            `[max(0, 1 - s), 1 + s]`, the hue shift in `[-hue, hue]`.
        color_jitter_prob: probability of the colour jitter (its four ops in a random order).
        grayscale_prob: probability of turning the crop grey.
        blur_probs: blur probability of (first global, second global, local) crops.
        blur_radius: range of the blur's standard deviation (the PIL radius of the CPU recipe).
        solarize_prob: solarisation probability of the second global crop.
        mean, std: normalisation.
        num_crops: when given, `forward` checks that it receives that many crop batches.
    """

    def __init__(
        self,
        flip_prob: float = 0.5,
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        color_jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5),
        blur_radius: tuple[float, float] = (0.1, 2.0),
        solarize_prob: float = 0.2,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        num_crops: int | None = None,
    ):
        super().__init__()
        if len(color_jitter) != 4:
            raise ValueError(f"color_jitter needs (brightness, contrast, saturation, hue), got {color_jitter}")
        if len(blur_probs) != 3:
            raise ValueError(f"blur_probs needs 3 probabilities (global 1, global 2, local), got {blur_probs}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {len(mean)} and {len(std)}")
        brightness, contrast, saturation, hue = (float(v) for v in color_jitter)
        if hue > 0.5:
            raise ValueError(f"the hue jitter must be at most 0.5, got {hue}")
        self.flip_prob = float(flip_prob)
        self.color_jitter = (brightness, contrast, saturation, hue)
        self.color_jitter_prob = float(color_jitter_prob)
        self.grayscale_prob = float(grayscale_prob)
        self.blur_probs = tuple(float(p) for p in blur_probs)
        self.blur_radius = (float(blur_radius[0]), float(blur_radius[1]))
        if not 0 <= self.blur_radius[0] <= self.blur_radius[1]:
            raise ValueError(f"blur_radius must be an increasing non-negative range, got {blur_radius}")
        self.solarize_prob = float(solarize_prob)
        self.num_crops = num_crops
        self.factor_ranges = (
            _factor_range(brightness, "brightness"),
            _factor_range(contrast, "contrast"),
            _factor_range(saturation, "saturation"),
            _factor_range(hue, "hue"),
        )
        #: kernel side for the largest sigma of the recipe, the same for every batch (no device sync)
        self.kernel_size = gaussian_kernel_size(self.blur_radius[1])
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_multicrop(cls, augmentation: MultiCropAugmentation) -> DevicePhotometricAugmentation:
        """The photometric recipe of `augmentation` (its `photometric_arguments`), for its crops."""
        return cls(**augmentation.photometric_arguments, num_crops=augmentation.num_crops)

    def extra_repr(self) -> str:
        return (
            f"flip_prob={self.flip_prob}, color_jitter={self.color_jitter}, "
            f"color_jitter_prob={self.color_jitter_prob}, grayscale_prob={self.grayscale_prob}, "
            f"blur_probs={self.blur_probs}, blur_radius={self.blur_radius}, kernel_size={self.kernel_size}, "
            f"solarize_prob={self.solarize_prob}, num_crops={self.num_crops}"
        )

    # ------------------------------------------------------------------------------ sampling
    def sample_parameters(
        self,
        batch_size: int,
        crop_index: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> PhotometricParameters:
        """Independent random decisions for `batch_size` crops of position `crop_index`.

        All draws come from one `[batch_size, 14]` uniform tensor on `device` (default: the
        generator's device, else the CPU), from `generator` or that device's default generator.
        """
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        draws = torch.rand(batch_size, _NUM_DRAWS, generator=generator, device=device)  # [B, 14]

        def happens(column: int, probability: float) -> torch.Tensor | None:
            return draws[:, column] < probability if probability > 0 else None  # [B] bool

        def uniform(column: int, bounds: tuple[float, float]) -> torch.Tensor:
            low, high = bounds
            return low + (high - low) * draws[:, column]  # [B]

        params = PhotometricParameters(flip=happens(_FLIP, self.flip_prob))
        if any(r is not None for r in self.factor_ranges):
            params.jitter = happens(_JITTER, self.color_jitter_prob)
        if params.jitter is not None:
            factors = [None if r is None else uniform(_FACTORS + k, r) for k, r in enumerate(self.factor_ranges)]
            params.brightness, params.contrast, params.saturation, params.hue = factors
            params.order = torch.argsort(draws[:, _ORDER : _ORDER + 4], dim=1)  # [B, 4], a uniform permutation
        params.grayscale = happens(_GRAY, self.grayscale_prob)
        params.blur = happens(_BLUR, self.blur_probs[min(crop_index, 2)])
        if params.blur is not None:
            params.sigma = uniform(_SIGMA, self.blur_radius)
        if crop_index == 1:
            params.solarize = happens(_SOLARIZE, self.solarize_prob)
        return params

    # ------------------------------------------------------------------------------ applying
    def _jitter(self, images: torch.Tensor, params: PhotometricParameters) -> torch.Tensor:
        """The four jitter ops, each at its per-sample position, on the samples with `params.jitter`."""
        batch = images.shape[0]
        ones = images.new_ones(batch)
        blend_factors = [params.brightness, params.contrast, params.saturation]
        blend_on = [f is not None for f in blend_factors]
        table = torch.stack([ones if f is None else f.to(images.dtype) for f in blend_factors], dim=1)  # [B, 3]
        jitter = _per_sample(params.jitter)
        for position in range(4):
            op = params.order[:, position]  # [B]
            if any(blend_on):
                # Brightness, contrast and saturation are one blend with a per-sample reference.
                reference = images.new_zeros(())  # brightness: black
                if blend_on[SATURATION] or blend_on[CONTRAST]:
                    grey = rgb_to_grayscale(images)  # [B, 1, h, w]
                    if blend_on[SATURATION]:
                        reference = torch.where(_per_sample(op == SATURATION), grey, reference)
                    if blend_on[CONTRAST]:
                        mean = grey.mean(dim=(1, 2, 3), keepdim=True)  # [B, 1, 1, 1]
                        reference = torch.where(_per_sample(op == CONTRAST), mean, reference)
                active = torch.zeros_like(op, dtype=torch.bool)
                for k, on in enumerate(blend_on):
                    if on:
                        active = active | (op == k)
                factor = _per_sample(table.gather(1, op.clamp(max=SATURATION).unsqueeze(1)))  # [B, 1, 1, 1]
                images = torch.where(jitter & _per_sample(active), _blend(images, reference, factor), images)
            if params.hue is not None:
                images = torch.where(jitter & _per_sample(op == HUE), adjust_hue(images, params.hue), images)
        return images

    def apply_parameters(self, images: torch.Tensor, params: PhotometricParameters) -> torch.Tensor:
        """uint8 `[B, 3, h, w]` (or float in [0, 1]) -> float32 `[B, 3, h, w]`, augmented and normalised."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected crops of shape [B, 3, h, w], got {tuple(images.shape)}")
        with torch.autocast(device_type=images.device.type, enabled=False):
            if images.dtype == torch.uint8:
                x = images.to(torch.float32) / 255.0
            else:
                x = images.to(torch.float32)
            if params.flip is not None:
                x = torch.where(_per_sample(params.flip), x.flip(-1), x)
            if params.jitter is not None:
                x = self._jitter(x, params)
            if params.grayscale is not None:
                x = torch.where(_per_sample(params.grayscale), rgb_to_grayscale(x).expand_as(x), x)
            if params.blur is not None:
                # Reflect padding needs the half kernel below the image side.
                size = min(self.kernel_size, 2 * (min(x.shape[-2:]) - 1) + 1)
                x = torch.where(_per_sample(params.blur), gaussian_blur(x, params.sigma, size), x)
            if params.solarize is not None:
                x = torch.where(_per_sample(params.solarize), solarize(x), x)
            mean, std = self.mean.to(x.device), self.std.to(x.device)
            return (x - mean) / std

    def forward(self, crops: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """`n_crops x` uint8 `[B, 3, h, w]` -> `n_crops x` float32 `[B, 3, h, w]`, on the crops' device.

        Consecutive local crops of one shape are augmented as one batch (their decisions are
        independent per sample anyway), which saves kernel launches.
        """
        if self.num_crops is not None and len(crops) != self.num_crops:
            raise ValueError(f"expected {self.num_crops} crop batches, got {len(crops)}")
        groups: list[list[int]] = []  # crop indices augmented together
        for index, crop in enumerate(crops):
            previous = groups[-1][0] if groups else -1
            same_kind = previous >= 2 and (crops[previous].shape[1:], crops[previous].dtype) == (
                crop.shape[1:],
                crop.dtype,
            )
            if index >= 3 and same_kind:
                groups[-1].append(index)
            else:
                groups.append([index])
        outputs: list[torch.Tensor] = [crops[0]] * len(crops)
        for group in groups:
            batch = crops[group[0]] if len(group) == 1 else torch.cat([crops[i] for i in group])
            params = self.sample_parameters(batch.shape[0], group[0], generator, batch.device)
            augmented = self.apply_parameters(batch, params)
            for index, part in zip(group, augmented.split([crops[i].shape[0] for i in group])):
                outputs[index] = part
        return outputs


def device_recipe_from(
    augmentation: MultiCropAugmentation,
) -> tuple[CropOnlyMultiCrop, DevicePhotometricAugmentation]:
    """The two halves of `augmentation`: the CPU crops and the device photometric recipe."""
    return CropOnlyMultiCrop.from_multicrop(augmentation), DevicePhotometricAugmentation.from_multicrop(augmentation)


__all__ = [
    "BRIGHTNESS",
    "CONTRAST",
    "HUE",
    "LUMA_WEIGHTS",
    "SATURATION",
    "CropOnlyMultiCrop",
    "DevicePhotometricAugmentation",
    "PhotometricParameters",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "device_recipe_from",
    "gaussian_blur",
    "gaussian_kernel_size",
    "rgb_to_grayscale",
    "solarize",
]
