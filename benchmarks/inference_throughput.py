"""Inference throughput of Swin-T: our `EsViTModel` vs timm's `SwinTransformer` vs transformers' `SwinModel`.

All three are the same architecture (Swin-T: embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7,
224 px), built with random weights, fed the same input batch, timed on the pooled feature
(`torch.inference_mode`, optional autocast and `torch.compile`). At 224 px timm computes the same
function as ours (see `backbone_speed.py`); transformers' Swin re-derives its windows per input
but is the same network at 224 px. A library that is not installed is skipped with a message.

    PYTHONPATH=. python benchmarks/inference_throughput.py --device cuda --batch 256 --precision bf16
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/inference_throughput.py --device cpu --batch 2 \\
        --steps 2 --warmup 1

Prints and writes (`--json`) images/s and peak memory per implementation: on CUDA the allocator's
peak during the timed forwards (weights included), on CPU the peak RSS of the process while that
model ran.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import PeakRss, describe_machine, synchronize  # noqa: E402

from esvit import EsViTConfig, EsViTModel  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def ours(config: EsViTConfig) -> torch.nn.Module:
    model = EsViTModel(config)
    return _Pooled(model, lambda out: out.pooler_output)


def timm_swin(config: EsViTConfig) -> torch.nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        img_size=config.image_size,
        patch_size=config.patch_sizes[0],
        embed_dim=config.hidden_sizes[0],
        depths=config.depths,
        num_heads=config.num_heads,
        window_size=config.window_size,
        num_classes=0,
        drop_path_rate=0.0,
    )


def transformers_swin(config: EsViTConfig) -> torch.nn.Module:
    from transformers import SwinConfig, SwinModel

    hf_config = SwinConfig(
        image_size=config.image_size,
        patch_size=config.patch_sizes[0],
        embed_dim=config.hidden_sizes[0],
        depths=list(config.depths),
        num_heads=list(config.num_heads),
        window_size=config.window_size,
        drop_path_rate=0.0,
        layer_norm_eps=config.layer_norm_eps,
    )
    return _Pooled(SwinModel(hf_config), lambda out: out.pooler_output)


class _Pooled(torch.nn.Module):
    """Return only the pooled feature `[B, C]` of a model with a structured output."""

    def __init__(self, model: torch.nn.Module, pick):
        super().__init__()
        self.model = model
        self.pick = pick

    def forward(self, x):
        return self.pick(self.model(x))


IMPLEMENTATIONS = {"esvit": ours, "timm": timm_swin, "transformers": transformers_swin}


def measure(name, build, config, x, args, device) -> dict:
    try:
        model = build(config)
    except ImportError as err:
        return {"implementation": name, "skipped": f"not installed ({err})"}
    model.eval().to(device)
    params = sum(p.numel() for p in model.parameters())
    forward = torch.compile(model) if args.compile else model
    autocast = torch.autocast(device.type, dtype=DTYPES[args.precision], enabled=args.precision != "fp32")

    def run():
        with torch.inference_mode(), autocast:
            return forward(x)

    for _ in range(args.warmup):
        out = run()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRss() if device.type == "cpu" else contextlib.nullcontext() as rss:
        start = time.perf_counter()
        for _ in range(args.steps):
            out = run()
        synchronize(device)
        seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.peak
    result = {
        "implementation": name,
        "images_per_s": x.shape[0] / seconds,
        "ms_per_batch": seconds * 1e3,
        "peak_memory_gib": peak / 2**30,
        "parameters_m": params / 1e6,
        "output_shape": list(out.shape),
    }
    del model, out
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="swin-tiny-w7")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--precision", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=list(IMPLEMENTATIONS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    config = EsViTConfig.from_preset(args.preset, drop_path_rate=0.0)
    if config.backbone_type != "swin":
        parser.error("timm / transformers comparisons exist for Swin presets only")
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
    header = {
        "machine": describe_machine(device),
        "torch": torch.__version__,
        "preset": args.preset,
        "batch": args.batch,
        "size": args.size,
        "precision": args.precision,
        "compile": args.compile,
        "steps": args.steps,
    }
    print(json.dumps(header))
    results = []
    for name in args.implementations:
        r = measure(name, IMPLEMENTATIONS[name], config, x, args, device)
        results.append(r)
        if "skipped" in r:
            print(f"{name:>12}: skipped, {r['skipped']}")
            continue
        print(
            f"{name:>12}: {r['images_per_s']:9.1f} img/s | {r['ms_per_batch']:8.1f} ms/batch | "
            f"peak {r['peak_memory_gib']:6.2f} GiB | {r['parameters_m']:.1f} M parameters"
        )
    mine = next((r for r in results if r["implementation"] == "esvit" and "images_per_s" in r), None)
    for r in results:
        if mine and "images_per_s" in r and r is not mine:
            r["esvit_speedup"] = mine["images_per_s"] / r["images_per_s"]
            print(f"esvit vs {r['implementation']}: {r['esvit_speedup']:.2f}x the images/s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**header, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
