"""Throughput and peak memory of EsViT backbones, forward (inference) and forward + backward.

For Swin, timm's `SwinTransformer` with the same configuration is measured alongside as a
reference implementation: at 224 px it computes the same function as the original EsViT code
(windows pinned at 224), so the two rows compare implementations, not architectures.

    python benchmarks/backbone_speed.py --presets swin-tiny-w7 vil-2262 cvt-s1 --batch_size 16
    python benchmarks/backbone_speed.py --device cuda --dtype bfloat16 --batch_size 128

Prints one markdown row per (model, resolution, mode): images/s and peak memory (CUDA: the
allocator's peak; CPU: the process's peak RSS, which includes the imports).
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from esvit import EsViTConfig, EsViTModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inference_throughput  # noqa: E402  (a sibling benchmark script)


def timm_swin(config: EsViTConfig) -> torch.nn.Module | None:
    """timm's Swin of the same shape (`inference_throughput.timm_swin`), or None without timm."""
    try:
        return inference_throughput.timm_swin(config)
    except ImportError:
        return None


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(model, size, batch, device, dtype, train: bool, steps: int, warmup: int) -> float:
    """Images per second of `steps` timed iterations after `warmup` untimed ones."""
    model.train(train)
    x = torch.randn(batch, 3, size, size, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast, torch.set_grad_enabled(train):
            out = model(x)
            out = out.pooler_output if hasattr(out, "pooler_output") else out
            if train:
                out.float().square().mean().backward()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["swin-tiny-w7", "vil-2262", "cvt-s1"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 96])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no_timm", action="store_true", help="skip the timm Swin reference rows")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    print(
        f"{machine}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
        f"batch {args.batch_size}\n"
    )
    print("| model | implementation | px | mode | images/s | peak memory (MiB) |\n|---|---|---|---|---|---|")
    for preset in args.presets:
        config = EsViTConfig.from_preset(preset, drop_path_rate=0.0)
        candidates = [("esvit", EsViTModel(config))]
        if config.backbone_type == "swin" and not args.no_timm:
            reference = timm_swin(config)
            if reference is not None:
                candidates.append(("timm", reference))
        for name, model in candidates:
            model.to(device)
            for size in args.sizes:
                if name == "timm" and size != config.image_size:
                    continue  # timm re-derives windows per input: another function below 224 px
                for train in (False, True):
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    ips = measure(model, size, args.batch_size, device, dtype, train, args.steps, args.warmup)
                    mode = "fwd+bwd" if train else "forward"
                    print(f"| {preset} | {name} | {size} | {mode} | {ips:.1f} | {peak_memory_mib(device):.0f} |")
            model.to("cpu")


if __name__ == "__main__":
    main()
