"""Peak memory and time of the EsViT loss: direct (per-pair gather) vs chunked (`EsViTLoss`).

The direct form follows the original implementation: per (teacher view, student view) pair it
gathers a `[B, T_s, K]` copy of the teacher distribution and a log-softmax of the same size, and
autograd keeps both until the backward pass. `EsViTLoss` computes the same values chunk by chunk
and keeps nothing per pair. Both variants compute the full loss (view + region terms); the view
term is `[B, K]` per crop and negligible next to the region term.

Each variant runs in a fresh subprocess. On CPU the figure is the growth of the process's peak
resident set size (`ru_maxrss`) over its size once the inputs exist, i.e. the loss's own working
memory for forward + backward, including the `[*, K]` gradient of the student region logits.
On CUDA it is `max_memory_allocated` over the allocation after the inputs.

Run from the repository root with the package installed (`pip install -e .`) or `PYTHONPATH=.`:

    OMP_NUM_THREADS=1 python benchmarks/region_loss_memory.py   # K=65536, B=32, 2+8 crops, 49/9 regions
    python benchmarks/region_loss_memory.py --batch 8 --device cuda

On a CPU shared with other jobs, one thread gives repeatable timings (idle OpenMP threads spin
while a busy core is taken away, which inflates the chunked variant's many small kernels).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from esvit.training.loss import EsViTLoss


def make_inputs(args: argparse.Namespace, device: torch.device):
    g = torch.Generator(device=device).manual_seed(0)
    tokens = [args.global_tokens] * args.global_crops + [args.local_tokens] * args.local_crops
    b, k, c = args.batch, args.out_dim, args.feat_dim

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device)

    student = SimpleNamespace(
        view_logits=rand(len(tokens) * b, k).requires_grad_(),
        region_logits=tuple(rand(b, n, k).requires_grad_() for n in tokens),
        region_features=tuple(rand(b, n, c) for n in tokens),
    )
    teacher = SimpleNamespace(
        view_logits=rand(args.global_crops * b, k),
        region_logits=tuple(rand(b, n, k) for n in tokens[: args.global_crops]),
        region_features=tuple(rand(b, n, c) for n in tokens[: args.global_crops]),
    )
    return student, teacher


def direct_loss(student, teacher, temp: float, num_global: int, student_temp: float = 0.1) -> torch.Tensor:
    """The objective with one full-size gather per pair, as the original computes it."""
    batch = teacher.view_logits.shape[0] // num_global
    n_crops = student.view_logits.shape[0] // batch
    q = F.softmax(teacher.view_logits / temp, dim=-1).chunk(num_global)
    s = (student.view_logits / student_temp).chunk(n_crops)
    t_region = [F.softmax(t / temp, dim=-1) for t in teacher.region_logits]
    s_region = [r / student_temp for r in student.region_logits]
    total = 0.0
    pairs = 0
    for iq in range(num_global):
        for v in range(n_crops):
            if v == iq:
                continue
            view = torch.sum(-q[iq] * F.log_softmax(s[v], dim=-1), dim=-1)
            sim = F.normalize(student.region_features[v], dim=-1) @ F.normalize(
                teacher.region_features[iq], dim=-1
            ).transpose(1, 2)
            index = sim.max(dim=2)[1]  # [B, T_s]
            matched = torch.gather(t_region[iq], 1, index.unsqueeze(2).expand(-1, -1, t_region[iq].shape[2]))
            region = torch.sum(-matched * F.log_softmax(s_region[v], dim=-1), dim=-1).mean(-1)
            total = total + (0.5 * view + 0.5 * region).mean()
            pairs += 1
    return total / pairs


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_variant(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    student, teacher = make_inputs(args, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    loss_fn = EsViTLoss(args.out_dim, region_chunk_size=args.chunk_size).to(device)
    cpu_start = time.process_time()
    start = time.perf_counter()
    if args.worker == "direct":
        loss = direct_loss(student, teacher, 0.04, args.global_crops)
    else:
        loss = loss_fn(student, teacher, teacher_temp=0.04).loss
    if device.type == "cuda":
        torch.cuda.synchronize()
    forward_s = time.perf_counter() - start
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    total_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start
    return {
        "variant": args.worker,
        "loss": loss.item(),
        "peak_extra_gib": peak / 2**30,
        "forward_s": forward_s,
        "forward_backward_s": total_s,
        "cpu_s": cpu_s,
        "chunk_rows": loss_fn.region_chunk_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out-dim", type=int, default=65536)
    parser.add_argument("--global-crops", type=int, default=2)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--global-tokens", type=int, default=49)
    parser.add_argument("--local-tokens", type=int, default=9)
    parser.add_argument("--feat-dim", type=int, default=768)
    parser.add_argument("--chunk-size", type=int, default=None, help="student tokens per chunk (default: auto)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", default="direct,chunked")
    parser.add_argument("--worker", choices=("direct", "chunked"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_variant(args)))
        return

    rows = args.batch * (args.global_tokens * args.global_crops + args.local_tokens * args.local_crops)
    logits_gib = rows * args.out_dim * 4 / 2**30
    print(
        f"B={args.batch} K={args.out_dim} crops={args.global_crops}+{args.local_crops} "
        f"regions={args.global_tokens}/{args.local_tokens} device={args.device} torch={torch.__version__} "
        f"threads={torch.get_num_threads()}; student region logits alone: {logits_gib:.2f} GiB"
    )
    passthrough = [
        f"--{name.replace('_', '-')}={value}"
        for name, value in vars(args).items()
        if name not in ("variants", "worker") and value is not None
    ]
    for variant in args.variants.split(","):
        done = subprocess.run(
            [sys.executable, __file__, *passthrough, "--worker", variant], capture_output=True, text=True
        )
        if done.returncode != 0:
            print(f"{variant:>8}: failed (rc {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{r['variant']:>8}: peak extra memory {r['peak_extra_gib']:6.2f} GiB | forward {r['forward_s']:6.2f} s | "
            f"forward+backward {r['forward_backward_s']:6.2f} s (CPU time {r['cpu_s']:6.2f} s) | loss {r['loss']:.6f}"
            + (f" | chunk {r['chunk_rows']} rows" if variant == "chunked" else "")
        )


if __name__ == "__main__":
    main()
