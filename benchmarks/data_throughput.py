"""CPU throughput of the multi-crop input pipeline: ours (`MultiCropCollator`) vs the classic torchvision one.

Both turn encoded JPEG files into a batch of 2 global (224 px) + 8 local (96 px) crops with
EsViT's / DINO's augmentations (random resized crop, flip, colour jitter, greyscale, blur,
solarisation, normalisation), in one process on one thread, so the figure is images/s per core
(a DataLoader with `n` workers scales it by about `n`):

* ours: `esvit.training.data.MultiCropCollator` over undecoded rows, as in pretraining: our decoder
  (`esvit.images.decode_image`: header checks, EXIF orientation, RGB, JPEG draft decoding down to
  the size the crops need), a per-image seed from the content hash, `MultiCropAugmentation`.
  Without 🤗 `datasets` installed the collator cannot be imported; the same decoder and
  augmentation then run directly (the collator's loop minus its hashing) and the output says so.
* classic: the original DINO / EsViT `DataAugmentationDINO` (torchvision transforms, PIL blur and
  solarisation), `Image.open(...).convert("RGB")`, `default_collate`.
* crop-only workers (uint8): the CPU half of the split recipe, what DataLoader workers do when the
  photometric half runs on the accelerator: the same collator and decoder with
  `esvit.training.device_augment.CropOnlyMultiCrop` (random resized crops -> uint8 tensors).
* device photometric: the other half, `DevicePhotometricAugmentation` (per-sample flip, colour
  jitter, greyscale, blur, solarisation, normalisation) on batches of those uint8 crops already on
  `--device` (default: cuda when available, else cpu), in images/s of that device (on the CPU
  with one thread, so per core as well). Host-to-device copies are not included.

The JPEGs are generated here: random smooth images (`--source smooth`, ImageNet-like 500x375 by
default) or the embedded Fashion-MNIST sample upscaled (`--source fashion-mnist`, needs pyarrow).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/data_throughput.py --images 64 --batch 16
    PYTHONPATH=. python benchmarks/data_throughput.py --device cuda --device-batch 256
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

from esvit.images import IMAGENET_MEAN, IMAGENET_STD, decode_image
from esvit.training.device_augment import CropOnlyMultiCrop, DevicePhotometricAugmentation
from esvit.training.multicrop import MultiCropAugmentation

EMBEDDED = Path(__file__).resolve().parents[1] / "esvit" / "data" / "fashion_mnist_500.parquet"


# ------------------------------------------------------------------------------------- images
def smooth_jpegs(count: int, width: int, height: int, seed: int, quality: int) -> list[bytes]:
    """Random smooth colour images (bicubic-upsampled noise plus fine grain), JPEG-encoded."""
    rng = np.random.default_rng(seed)
    files = []
    for _ in range(count):
        coarse = rng.integers(0, 256, size=(rng.integers(4, 12), rng.integers(4, 12), 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        grain = rng.normal(0, 6, size=(height, width, 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        files.append(buf.getvalue())
    return files


def fashion_mnist_jpegs(count: int, side: int, quality: int) -> list[bytes]:
    """The embedded Fashion-MNIST images (28x28 PNG) upscaled to `side` and JPEG-encoded."""
    import pyarrow.parquet as pq

    rows = pq.read_table(EMBEDDED, columns=["image"]).column("image").to_pylist()
    files = []
    for i in range(count):
        image = Image.open(io.BytesIO(rows[i % len(rows)]["bytes"])).convert("RGB").resize((side, side), Image.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        files.append(buf.getvalue())
    return files


# ---------------------------------------------------------------------------- classic pipeline
class _PILBlur:
    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img):
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class _Solarize:
    def __init__(self, p: float):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


class ClassicDINOAugmentation:
    """DINO's `DataAugmentationDINO` (main_dino.py), as EsViT's original code uses it."""

    def __init__(self, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), local_crops: int = 8):
        flip_and_color_jitter = transforms.Compose(
            [
                transforms.RandomHorizontalFlip(p=0.5),
                transforms.RandomApply(
                    [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8
                ),
                transforms.RandomGrayscale(p=0.2),
            ]
        )
        normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        bicubic = Image.BICUBIC
        self.global_1 = transforms.Compose(
            [
                transforms.RandomResizedCrop(224, scale=global_scale, interpolation=bicubic),
                flip_and_color_jitter,
                _PILBlur(1.0),
                normalize,
            ]
        )
        self.global_2 = transforms.Compose(
            [
                transforms.RandomResizedCrop(224, scale=global_scale, interpolation=bicubic),
                flip_and_color_jitter,
                _PILBlur(0.1),
                _Solarize(0.2),
                normalize,
            ]
        )
        self.local = transforms.Compose(
            [
                transforms.RandomResizedCrop(96, scale=local_scale, interpolation=bicubic),
                flip_and_color_jitter,
                _PILBlur(0.5),
                normalize,
            ]
        )
        self.local_crops = local_crops

    def __call__(self, image):
        return [self.global_1(image), self.global_2(image)] + [self.local(image) for _ in range(self.local_crops)]


def classic_batch(files: list[bytes], augment: ClassicDINOAugmentation) -> list[torch.Tensor]:
    per_image = [augment(Image.open(io.BytesIO(raw)).convert("RGB")) for raw in files]
    return torch.utils.data.default_collate(per_image)


# -------------------------------------------------------------------------------- our pipeline
def _collating(augment):
    """`(files) -> crops` through `MultiCropCollator` with `augment`, or its decoder + `augment` without datasets."""
    # the shorter side above which no crop is upsampled (`data.min_side_for_crops` of this recipe)
    min_side = int(max(224 / 0.4**0.5, 96 / 0.05**0.5)) + 1
    try:
        from esvit.training.data import MultiCropCollator
    except ImportError as err:
        note = f"MultiCropCollator skipped ({err}); ran its decoder and augmentation directly"

        def run(files):
            per_image = [augment(decode_image(raw, min_side=min_side), seed=i) for i, raw in enumerate(files)]
            return [torch.stack(group) for group in zip(*per_image)]

        return run, note
    collator = MultiCropCollator(augment, seed=0, min_side=min_side)

    def run(files):
        return collator([{"image": {"bytes": raw, "path": None}} for raw in files])["crops"]

    return run, "MultiCropCollator"


def our_batch_function(local_crops: int):
    """`(files) -> crops` of the full CPU recipe (`MultiCropAugmentation`)."""
    return _collating(MultiCropAugmentation(num_local_crops=local_crops))


def crop_only_batch_function(local_crops: int):
    """`(files) -> uint8 crops` of the CPU half of the split recipe (`CropOnlyMultiCrop`)."""
    run, note = _collating(CropOnlyMultiCrop(num_local_crops=local_crops))
    return run, f"{note} + CropOnlyMultiCrop"


def measure_device(crops: list[torch.Tensor], local_crops: int, device: torch.device, repeats: int) -> float:
    """Images per second of `DevicePhotometricAugmentation` on uint8 `crops` (n_crops x [B, 3, h, w]) on `device`."""
    photometric = DevicePhotometricAugmentation.from_multicrop(MultiCropAugmentation(num_local_crops=local_crops))
    photometric = photometric.to(device)
    crops = [c.to(device) for c in crops]
    generator = torch.Generator(device=device).manual_seed(0)

    def synchronize() -> None:
        if device.type != "cpu":
            getattr(torch, device.type).synchronize()

    photometric(crops, generator)  # warm-up (kernel selection, allocator)
    synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        views = photometric(crops, generator)
        synchronize()
        best = min(best, time.perf_counter() - start)
    assert views[0].dtype == torch.float32 and views[0].shape == crops[0].shape
    return crops[0].shape[0] / best


def measure(run, files: list[bytes], batch: int, repeats: int) -> float:
    """Images per second: the best of `repeats` passes over all files, in batches (after one batch)."""
    run(files[:batch])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(files), batch):
            crops = run(files[i : i + batch])
        best = min(best, time.perf_counter() - start)
    assert len(crops) == 10 or crops, "no crops"
    return len(files) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--source", choices=["smooth", "fashion-mnist"], default="smooth")
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--fashion-side", type=int, default=448, help="side of the upscaled Fashion-MNIST images")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the device photometric half runs (default: cuda when available, else cpu)",
    )
    parser.add_argument(
        "--device-batch", type=int, default=None, help="images per device photometric batch (default: --batch)"
    )
    args = parser.parse_args()

    torch.set_num_threads(1)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    source = args.source
    if source == "fashion-mnist":
        try:
            files = fashion_mnist_jpegs(args.images, args.fashion_side, args.quality)
            size = f"{args.fashion_side}x{args.fashion_side}"
        except ImportError as err:
            print(f"fashion-mnist source needs pyarrow ({err}); using smooth random images")
            source = "smooth"
    if source == "smooth":
        files = smooth_jpegs(args.images, args.width, args.height, args.seed, args.quality)
        size = f"{args.width}x{args.height}"
    ours, ours_note = our_batch_function(args.local_crops)
    crop_only, crop_only_note = crop_only_batch_function(args.local_crops)
    classic_aug = ClassicDINOAugmentation(local_crops=args.local_crops)
    header = {
        "machine": f"{platform.processor() or platform.machine()} CPU, 1 process, 1 thread",
        "torch": torch.__version__,
        "source": source,
        "image_size": size,
        "images": len(files),
        "mean_jpeg_kib": sum(map(len, files)) / len(files) / 1024,
        "batch": args.batch,
        "crops": f"2x224 + {args.local_crops}x96",
        "device": args.device,
    }
    print(json.dumps(header))
    if ours_note != "MultiCropCollator":
        print(ours_note)
    results = []
    for name, run, note in (
        ("ours", ours, ours_note),
        ("classic torchvision (DINO DataAugmentationDINO)", lambda f: classic_batch(f, classic_aug), "default_collate"),
        ("crop-only workers (uint8)", crop_only, crop_only_note),
    ):
        ips = measure(run, files, args.batch, args.repeats)
        results.append({"pipeline": name, "images_per_s_per_core": ips, "path": note})
        print(f"{name:>48}: {ips:7.1f} images/s per core ({note})")
    # the device half: uint8 crops of `--device-batch` images (the files repeated when fewer)
    device = torch.device(args.device)
    device_batch = args.device_batch or args.batch
    uint8_crops = crop_only([files[i % len(files)] for i in range(device_batch)])
    device_ips = measure_device(uint8_crops, args.local_crops, device, args.repeats)
    device_note = f"DevicePhotometricAugmentation, batch {device_batch}, crops already on {device}"
    results.append(
        {"pipeline": "device photometric", "images_per_s": device_ips, "device": str(device), "path": device_note}
    )
    print(f"{'device photometric':>48}: {device_ips:7.1f} images/s on {device} ({device_note})")
    ratio = results[0]["images_per_s_per_core"] / results[1]["images_per_s_per_core"]
    crop_only_ratio = results[2]["images_per_s_per_core"] / results[0]["images_per_s_per_core"]
    print(f"ours / classic: {ratio:.2f}x; crop-only / ours: {crop_only_ratio:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = {**header, "results": results, "ours_over_classic": ratio, "crop_only_over_ours": crop_only_ratio}
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
