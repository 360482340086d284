#!/usr/bin/env python
"""Fashion-MNIST on one GPU within a time budget: EsViT pretraining, then k-NN and the fast linear probe.

The whole input pipeline runs on the device: the 60,000 28-px training images are held in GPU memory
(47 MB), and each step draws a batch, cuts its random resized crops (`esvit.training.device_crops`)
and applies flip, colour jitter, greyscale, blur and solarisation per sample
(`esvit.training.device_augment`), so no DataLoader worker limits the step. The step itself is
`EsViTPretrainer.train_step` / `update_teacher`, built by `build_pretrainer` from the same arguments
`run_pretraining.py` takes (`--recipe`, `--train_args`), under bf16 autocast on a GPU.

The schedules need the number of steps in advance: a short calibration (`--calibration_steps`)
times the step, and the run is planned to fill `--minutes` of pretraining. The teacher's features
are scored before training (random weights of the same architecture, the baseline) and after, on
the 10,000 test images with the 60,000 training images as memory: weighted k-NN (k=20, T=0.07,
pooled feature) and the fast linear probe (last-4-block features), as
`benchmarks/fashion_mnist_quality.py` and `run_linear_probe.py` score them.

    python benchmarks/fashion_mnist_gpu.py --minutes 6 --json fmnist_gpu.json          # one GPU
    python benchmarks/fashion_mnist_gpu.py --device cpu --minutes 0.2 --max_train_images 512 \\
        --max_test_images 256 --batch_size 32 --calibration_steps 2                     # a CPU check

Data: the IDX files of Debian's `dataset-fashion-mnist` (`--data_dir`, default
/usr/share/datasets/fashion-mnist), read without `datasets` (nothing here imports it, so the script
runs where only torch, transformers, accelerate and timm are installed; the four files are 31 MB
to copy along). About 8 minutes in all on one GPU with the default 6-minute budget: start-up,
calibration, two scorings of 70k images and the pretraining.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from prepare_fashion_mnist import DEBIAN_DIR, FILES, read_idx  # noqa: E402

from esvit.evaluation.knn import knn_classify  # noqa: E402
from esvit.evaluation.linear_probe import fast_linear_probe  # noqa: E402
from esvit.images import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from esvit.training.arguments import parse_arguments  # noqa: E402
from esvit.training.builders import build_pretrainer, make_accelerator  # noqa: E402
from esvit.training.device_augment import DevicePhotometricAugmentation  # noqa: E402
from esvit.training.device_crops import random_resized_crops  # noqa: E402


def load_images(data_dir: str, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images `[N, 28, 28]` and int64 labels `[N]` of one split."""
    stem = FILES[split]
    images = torch.from_numpy(read_idx(f"{data_dir}/{stem}-images-idx3-ubyte.gz").copy())
    labels = torch.from_numpy(read_idx(f"{data_dir}/{stem}-labels-idx1-ubyte.gz").copy()).long()
    return (images[:limit], labels[:limit]) if limit else (images, labels)


class DeviceMultiCrop:
    """A batch of grey uint8 images on the device -> the multi-crop list of normalised crops."""

    def __init__(self, data_args, num_crops: int):
        self.global_size, self.global_scale = data_args.global_crop_size, tuple(data_args.global_crops_scale)
        self.local_size, self.local_scale = data_args.local_crop_size, tuple(data_args.local_crops_scale)
        self.num_local = data_args.num_local_crops
        self.photometric = DevicePhotometricAugmentation(num_crops=num_crops, blur_probs=tuple(data_args.blur_probs))

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        x = images[:, None].float().expand(-1, 3, -1, -1)  # [B, 3, 28, 28], 0..255
        crops = [random_resized_crops(x, self.global_size, self.global_scale, generator=generator) for _ in range(2)]
        crops += [
            random_resized_crops(x, self.local_size, self.local_scale, generator=generator)
            for _ in range(self.num_local)
        ]
        crops = [c.round().clamp_(0, 255).to(torch.uint8) for c in crops]  # the photometric half takes uint8
        return self.photometric(crops, generator=generator)


@torch.no_grad()
def teacher_features(model, images: torch.Tensor, batch_size: int, autocast) -> dict[str, torch.Tensor]:
    """Pooled `[N, C]` and last-4-block `[N, D]` features of uint8 images `[N, 28, 28]` (float32)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=images.device)[:, None, None]
    n = min(4, model.config.num_blocks)
    pooled, blocks = [], []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size, None].float().div(255).expand(-1, 3, -1, -1)  # [b, 3, 28, 28]
        with autocast():
            out = model._encode((x - mean) / std, output_block_features=True)
        pooled.append(out.pooler_output.float())
        blocks.append(torch.cat(out.block_features[-n:], dim=-1).float())
    return {"pooled": torch.cat(pooled), "n_last_blocks": torch.cat(blocks)}


def score(pretrainer, data, args) -> dict:
    """k-NN and fast-linear top-1 of the teacher's features on the test images."""
    start = time.perf_counter()
    model = pretrainer.teacher.esvit
    train = teacher_features(model, data["train_x"], args.eval_batch_size, pretrainer.accelerator.autocast)
    test = teacher_features(model, data["test_x"], args.eval_batch_size, pretrainer.accelerator.autocast)
    train_y, test_y = data["train_y"].to(train["pooled"].device), data["test_y"].to(train["pooled"].device)
    knn = knn_classify(train["pooled"], train_y, test["pooled"], test_y, 10, ks=[20], temperature=0.07)[20]
    probe = fast_linear_probe(train["n_last_blocks"], train_y, test["n_last_blocks"], test_y, 10,
                              lrs=(1e-3, 1e-2, 1e-1), epochs=args.probe_epochs, seed=args.seed)  # fmt: skip
    return {"knn_top1": knn["top1"], "linear_top1": probe.test["top1"], "eval_seconds": time.perf_counter() - start}


def build(args, steps: int, output_dir: str):
    argv = ["--recipe", args.recipe, "--per_device_train_batch_size", str(args.batch_size),
            "--max_train_steps", str(steps), "--output_dir", output_dir, "--report_to", "none",
            "--seed", str(args.seed), *(["--cpu", "true"] if args.device == "cpu" else []),
            *shlex.split(args.train_args)]  # fmt: skip
    model_args, data_args, train_args = parse_arguments(argv)
    accelerator = make_accelerator(train_args)
    steps_per_epoch = max(1, args.num_train // args.batch_size)
    pretrainer = build_pretrainer(model_args, data_args, train_args, accelerator, steps_per_epoch)
    augment = DeviceMultiCrop(data_args, num_crops=2 + data_args.num_local_crops)
    return pretrainer, augment, train_args


def train(pretrainer, augment, images: torch.Tensor, steps: int, batch_size: int, seed: int) -> float:
    """`steps` optimizer steps on random batches (a fresh permutation each epoch); seconds taken."""
    device = images.device
    generator = torch.Generator(device=device).manual_seed(seed)
    order, position = torch.randperm(images.shape[0], device=device, generator=generator), 0
    start = time.perf_counter()
    for step in range(steps):
        if position + batch_size > order.numel():
            order, position = torch.randperm(images.shape[0], device=device, generator=generator), 0
        batch = images[order[position : position + batch_size]]  # [B, 28, 28] uint8
        position += batch_size
        out = pretrainer.train_step(augment(batch, generator), step)
        if out.optimizer_step:
            pretrainer.update_teacher(step)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=DEBIAN_DIR)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--minutes", type=float, default=6.0, help="pretraining budget (calibration excluded)")
    parser.add_argument("--recipe", default="fashion-mnist-cpu", help="run_pretraining.py recipe (architecture)")
    parser.add_argument(
        "--train_args", default="", help="more run_pretraining.py arguments, e.g. '--num_local_crops 2'"
    )
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--calibration_steps", type=int, default=30)
    parser.add_argument("--max_train_images", type=int, default=None)
    parser.add_argument("--max_test_images", type=int, default=None)
    parser.add_argument("--eval_batch_size", type=int, default=2000)
    parser.add_argument("--probe_epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    train_x, train_y = load_images(args.data_dir, "train", args.max_train_images)
    test_x, test_y = load_images(args.data_dir, "test", args.max_test_images)
    data = {"train_x": train_x.to(device), "train_y": train_y, "test_x": test_x.to(device), "test_y": test_y}
    args.num_train = train_x.shape[0]

    with tempfile.TemporaryDirectory() as output_dir:
        # calibration: the step time of this machine, on a throwaway run
        pretrainer, augment, _ = build(args, 10**6, output_dir)
        warm = max(1, args.calibration_steps // 3)
        train(pretrainer, augment, data["train_x"], warm, args.batch_size, args.seed)  # kernels, autotuning
        seconds = train(pretrainer, augment, data["train_x"], args.calibration_steps, args.batch_size, args.seed)
        step_seconds = seconds / args.calibration_steps
        steps = max(1, math.floor(args.minutes * 60 / step_seconds))
        print(f"calibration: {1000 * step_seconds:.1f} ms/step -> {steps} steps in {args.minutes} min", flush=True)
        del pretrainer, augment
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

        pretrainer, augment, train_args = build(args, steps, output_dir)
        initial = score(pretrainer, data, args)  # random weights, same architecture
        print(f"random weights: k-NN {initial['knn_top1']:.2f}%, linear {initial['linear_top1']:.2f}%", flush=True)
        train_seconds = train(pretrainer, augment, data["train_x"], steps, args.batch_size, args.seed)
        final = score(pretrainer, data, args)

    images = steps * args.batch_size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {
        "device": name, "torch": torch.__version__, "recipe": args.recipe, "train_args": args.train_args,
        "batch_size": args.batch_size, "steps": steps, "images_seen": images, "epochs": images / args.num_train,
        "train_seconds": train_seconds, "images_per_second": images / train_seconds,
        "mixed_precision": pretrainer.accelerator.mixed_precision, "use_region_loss": pretrainer.loss_fn.use_region_loss,
        "random": initial, "pretrained": final, "num_train": args.num_train, "num_test": int(test_x.shape[0]),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }  # fmt: skip
    print(
        f"\n| features | k-NN top-1 (k=20) | linear top-1 | pretraining |\n|---|---|---|---|\n"
        f"| random weights | {initial['knn_top1']:.2f}% | {initial['linear_top1']:.2f}% | none |\n"
        f"| EsViT ({args.recipe}{', ' + args.train_args if args.train_args else ''}) | {final['knn_top1']:.2f}% | "
        f"{final['linear_top1']:.2f}% | {steps} steps x {args.batch_size} ({result['epochs']:.1f} epochs), "
        f"{train_seconds / 60:.1f} min, {result['images_per_second']:.0f} img/s |\n\n"
        f"Machine: {name}, torch {torch.__version__}, {result['mixed_precision']} autocast; "
        f"train {args.num_train} / test {result['num_test']} images."
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
