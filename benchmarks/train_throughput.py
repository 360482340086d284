"""Training throughput of EsViT pretraining: the real `EsViTPretrainer` step on synthetic multi-crop batches.

Every timed iteration is what `run_pretraining.py` does per optimizer step: teacher forward on the
global crops, student forward on all crops, `EsViTLoss` (view + region), backward, schedules,
per-parameter clipping, AdamW, then `update_teacher` (centres + EMA). The crops are random tensors
already on the device, so the figure excludes data loading (see `data_throughput.py`).

    # the released Swin-T recipe on one GPU (2x224 + 8x96 crops, K = 65536), bf16 autocast
    PYTHONPATH=. python benchmarks/train_throughput.py --device cuda --batch 64 --precision bf16
    # same, against the plain composition (per-pair loss, unfused weight norm) in the same run
    PYTHONPATH=. python benchmarks/train_throughput.py --device cuda --batch 64 --precision bf16 \\
        --reference per-pair
    # a tiny model on one CPU thread
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/train_throughput.py --device cpu --batch 4 \\
        --set hidden_sizes=32,64,128,256 depths=2,2,2,2 num_heads=1,2,4,8 --out-dim 4096 --steps 3 --warmup 1

Printed and written (`--json`): images/s, ms/step, peak memory (CUDA `max_memory_allocated` of the
timed steps; on CPU the process's peak RSS), the FLOPs of one step counted by
`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention: forward + backward
of teacher, student and heads) and the fraction of `--peak-flops` they reach (790e12 by default:
an H200's dense bf16 tensor-core rate; pass the fp32 or fp16 rate for those precisions if wanted).

`--reference per-pair` additionally times, in the same process, the composition this project had
before the loss and head fusions: one cross-entropy per (teacher view, student view) pair, with
its own log-softmax and its own gather, the teacher entropy from a second log-softmax pass, and
the weight norm `g * v / ||v||` as separate ops. `--reference original-composition` is the
original code's composition: per pair, a full `[B, T_s, K]` gather and log-softmax kept for the
backward (memory grows with K; it can run out where ours does not). Both start from the same
weights and crops as ours and see the same drop-path masks; the first step's loss of the two is
compared (equal to ~1e-7 relative in fp32). The variants are timed in turn, step by step, after
each has warmed up, so lazy initialisation and load changes on a shared machine hit both alike;
their peak memory is then measured with both resident (on CPU the RSS is the process's).

`--profile FILE` runs one more step of ours under `torch.profiler` and writes the ops with the
most self time (GPU time on CUDA), grouped by input shapes.

Without `accelerate` installed a minimal stand-in accelerator (one process, the same autocast and
fp16 loss scaling) drives the step instead, and the output says so.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import gc
import json
import platform
import resource
import threading
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from esvit import EsViTConfig, EsViTForPreTraining
from esvit.heads import WeightNormLinear
from esvit.training.loss import DEFAULT_CHUNK_NUMEL, EsViTLoss, EsViTLossOutput
from esvit.training.optim import build_optimizer, get_param_groups
from esvit.training.pretrainer import EsViTPretrainer
from esvit.training.schedules import TrainingPlan, build_schedules
from esvit.training.targets import compute_dtype

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


# ---------------------------------------------------------------------------------- accelerator
class MinimalAccelerator:
    """The part of `accelerate.Accelerator` that `EsViTPretrainer` uses, for one process without
    gradient accumulation; only used when accelerate is not installed."""

    sync_gradients = True
    num_processes = 1

    def __init__(self, device: torch.device, mixed_precision: str, compile_student: bool):
        self.device = device
        self.compile_student = compile_student
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
        self.scaler = torch.amp.GradScaler(device.type) if mixed_precision == "fp16" else None
        self._optimizer = None

    def prepare(self, model, optimizer):
        self._optimizer = optimizer
        return (torch.compile(model) if self.compile_student else model), optimizer

    def unwrap_model(self, model, keep_torch_compile: bool = True):
        return getattr(model, "_orig_mod", model)

    def accumulate(self, *models):
        return contextlib.nullcontext()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_gradients(self):
        if self.scaler is not None:
            self.scaler.unscale_(self._optimizer)


def make_accelerator(device: torch.device, precision: str, compile_student: bool, minimal: bool = False):
    try:
        if minimal:
            raise ImportError("--minimal-accelerator")
        from accelerate import Accelerator
    except ImportError as err:
        return MinimalAccelerator(device, PRECISIONS[precision], compile_student), f"minimal ({err})"
    accelerator = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=PRECISIONS[precision],
        dynamo_backend="inductor" if compile_student else None,
    )
    return accelerator, f"accelerate {__import__('accelerate').__version__}"


# ------------------------------------------------------------------------ reference compositions
def plain_weight_norm_forward(self: WeightNormLinear, x: torch.Tensor) -> torch.Tensor:
    """`WeightNormLinear` as separate ops: `F.linear(x, g * v / ||v||)`."""
    return F.linear(x, self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True))


def plain_centered_targets(logits, center, temp, chunk_rows):
    """`softmax((t - c) / temp)` and its entropy from a second (log-softmax) pass, per chunk."""
    dtype = compute_dtype(logits)
    probs = torch.empty(logits.shape, dtype=dtype, device=logits.device)
    entropy = torch.zeros((), dtype=dtype, device=logits.device)
    for start in range(0, logits.shape[0], chunk_rows):
        scaled = (logits[start : start + chunk_rows].to(dtype) - center) / temp
        chunk_probs = F.softmax(scaled, dim=-1)
        probs[start : start + chunk_rows] = chunk_probs
        entropy -= torch.sum(chunk_probs * F.log_softmax(scaled, dim=-1))
    return probs, entropy


class PairwiseMatchedCrossEntropy(torch.autograd.Function):
    """The per-pair region cross-entropy as it was before the fusions: `[N_s]` values of
    `sum_k -t[m(a), k] * log_softmax(s[a] / tau)_k`, chunked, with fresh temporaries per chunk."""

    @staticmethod
    def forward(ctx, student_logits, teacher_probs, match_index, student_temp, chunk_rows):
        dtype = compute_dtype(student_logits)
        out = torch.empty(student_logits.shape[0], dtype=dtype, device=student_logits.device)
        for start in range(0, student_logits.shape[0], chunk_rows):
            stop = start + chunk_rows
            scaled = student_logits[start:stop].to(dtype) / student_temp
            target = teacher_probs.index_select(0, match_index[start:stop])
            out[start:stop] = torch.sum(-target * F.log_softmax(scaled, dim=-1), dim=-1)
        ctx.save_for_backward(student_logits, teacher_probs, match_index)
        ctx.student_temp, ctx.chunk_rows = student_temp, chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        student_logits, teacher_probs, match_index = ctx.saved_tensors
        temp, chunk_rows = ctx.student_temp, ctx.chunk_rows
        grad = torch.empty_like(student_logits)
        dtype = compute_dtype(student_logits)
        for start in range(0, student_logits.shape[0], chunk_rows):
            stop = start + chunk_rows
            scaled = student_logits[start:stop].to(dtype) / temp
            target = teacher_probs.index_select(0, match_index[start:stop])
            chunk = torch.softmax(scaled, dim=-1) * target.sum(dim=-1, keepdim=True) - target
            chunk.mul_((grad_out[start:stop].to(dtype) / temp).unsqueeze(-1))
            grad[start:stop] = chunk.to(grad.dtype)
        return grad, None, None, None, None


def pairwise_region_cross_entropy(student_logits, teacher_probs, match, temp, chunk_rows):
    batch, tokens, dim = student_logits.shape
    offsets = torch.arange(batch, device=match.device).unsqueeze(1) * teacher_probs.shape[1]
    per_token = PairwiseMatchedCrossEntropy.apply(
        student_logits.reshape(-1, dim), teacher_probs.reshape(-1, dim), (match + offsets).reshape(-1), temp, chunk_rows
    )
    return per_token.view(batch, tokens)


class PerPairLoss(EsViTLoss):
    """`EsViTLoss` composed pair by pair, as before the fusions (`direct=False`: the chunked
    per-pair region cross-entropy with its chunk of 2**24 elements on every device; `direct=True`:
    the original code's full-size gather per pair). Centres, checks and the centre update are
    `EsViTLoss`'s own."""

    def __init__(self, *args, direct: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.direct = direct
        self._region_chunk_size = max(1, DEFAULT_CHUNK_NUMEL // self.out_dim)
        if self.teacher_normalization == "centering":
            self._teacher_targets = plain_centered_targets

    def _loss(self, student, teacher, teacher_temp, batch, num_crops) -> EsViTLossOutput:
        t_view = teacher.view_logits.detach()
        t_probs, view_entropy = self._teacher_targets(t_view, self.view_center, teacher_temp, t_view.shape[0])
        teacher_view = t_probs.chunk(self.num_global_crops)
        s_view = student.view_logits
        student_view_log = [
            F.log_softmax(s, dim=-1) for s in (s_view.to(compute_dtype(s_view)) / self.student_temp).chunk(num_crops)
        ]
        region_entropy = None
        if self.use_region_loss:
            t_region, t_feat, ent, tokens = [], [], 0.0, 0
            for logits, feats in zip(teacher.region_logits, teacher.region_features):
                flat = logits.detach().reshape(-1, self.out_dim)
                probs, e = self._teacher_targets(flat, self.region_center, teacher_temp, self.region_chunk_size)
                t_region.append(probs.view(logits.shape))
                t_feat.append(F.normalize(feats.detach().float(), dim=-1))
                ent, tokens = ent + e, tokens + flat.shape[0]
            region_entropy = ent / tokens
            s_feat = [F.normalize(f.detach().float(), dim=-1) for f in student.region_features]
        total, view_total, region_total, pairs = 0.0, 0.0, 0.0, 0
        for iq, target in enumerate(teacher_view):
            for v in range(num_crops):
                if v == iq:
                    continue
                view_ce = torch.sum(-target * student_view_log[v], dim=-1)
                pair = view_ce
                if self.use_region_loss:
                    with torch.no_grad():
                        match = torch.matmul(s_feat[v], t_feat[iq].transpose(1, 2)).max(dim=2)[1]
                    s_region = student.region_logits[v]
                    if self.direct:
                        index = match.unsqueeze(2).expand(-1, -1, self.out_dim)
                        matched = torch.gather(t_region[iq], 1, index)
                        log_p = F.log_softmax(s_region.float() / self.student_temp, dim=-1)
                        region_ce = torch.sum(-matched * log_p, dim=-1).mean(-1)
                    else:
                        region_ce = pairwise_region_cross_entropy(
                            s_region, t_region[iq], match, self.student_temp, self.region_chunk_size
                        ).mean(-1)
                    pair = self.view_weight * view_ce + self.region_weight * region_ce
                    region_total += region_ce.detach().mean()
                total = total + pair.mean()
                view_total += view_ce.detach().mean()
                pairs += 1
        return EsViTLossOutput(
            loss=total / pairs,
            view_loss=view_total / pairs,
            region_loss=region_total / pairs if self.use_region_loss else None,
            teacher_view_entropy=view_entropy / t_view.shape[0],
            teacher_region_entropy=region_entropy,
            num_pairs=pairs,
        )


# ---------------------------------------------------------------------------------- measurement
def parse_overrides(items: list[str]) -> dict:
    """`["depths=2,2,2,2", "window_size=7"]` -> `{"depths": (2, 2, 2, 2), "window_size": 7}`."""
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        parsed = ast.literal_eval(value)
        overrides[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    return overrides


class PeakRss:
    """Largest resident set size of this process while active, sampled every 5 ms (on CPU the
    process-wide `ru_maxrss` would carry one variant's peak over into the next)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def peak_memory_bytes(device: torch.device, rss: PeakRss | None) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if rss is not None and Path("/proc/self/statm").exists():
        return rss.peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_pretrainer(args, config, state, accelerator, device, variant: str) -> EsViTPretrainer:
    student = EsViTForPreTraining(config)
    teacher_config = copy.deepcopy(config)
    teacher_config.drop_path_rate = 0.0
    teacher = EsViTForPreTraining(teacher_config)
    student.load_state_dict(state)
    teacher.load_state_dict(state)
    teacher.requires_grad_(False)
    student.train().to(device)
    teacher.train().to(device)
    loss_kwargs = dict(out_dim=config.head_out_dim, num_global_crops=args.global_crops)
    loss_kwargs["use_region_loss"] = not args.view_only
    if variant == "ours":
        loss_fn = EsViTLoss(**loss_kwargs)
    else:
        loss_fn = PerPairLoss(**loss_kwargs, direct=variant == "original-composition")
        for model in (student, teacher):
            for module in model.modules():
                if isinstance(module, WeightNormLinear):
                    module.forward = types.MethodType(plain_weight_norm_forward, module)
    loss_fn.to(device)
    if variant == "ours":  # as run_pretraining.py builds it: fused AdamW on CUDA
        optimizer = build_optimizer(get_param_groups(student), "auto", torch.device(device))
    else:
        optimizer = torch.optim.AdamW(get_param_groups(student))
    student, optimizer = accelerator.prepare(student, optimizer)
    total = args.warmup + args.steps + 1
    schedules = build_schedules(
        epochs=1, steps_per_epoch=total, global_batch_size=args.batch, warmup_epochs=0, warmup_teacher_temp_epochs=0
    )
    plan = TrainingPlan(schedules=schedules, total_steps=total, freeze_last_layer_steps=0, epoch_based=True)
    pretrainer = EsViTPretrainer(accelerator, student, teacher, loss_fn, optimizer, plan)
    if args.compile:
        # set afterwards: `EsViTPretrainer` tests `teacher_forward or teacher`, and the truth value of a
        # compiled module raises (`OptimizedModule.__len__`)
        pretrainer.teacher_forward = torch.compile(teacher)
    return pretrainer


def count_step_flops(pretrainer: EsViTPretrainer, crops: list[torch.Tensor]) -> int:
    """Matmul / conv / attention FLOPs of one step's forwards and backward, on the eager modules."""
    from torch.utils.flop_counter import FlopCounterMode

    student = pretrainer.unwrapped_student
    region = pretrainer.loss_fn.use_region_loss
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.no_grad(), pretrainer.accelerator.autocast():
            teacher_out = pretrainer.teacher(crops[: pretrainer.loss_fn.num_global_crops], compute_region=region)
        with pretrainer.accelerator.autocast():
            student_out = student(crops, compute_region=region)
        out = pretrainer.loss_fn(student_out, teacher_out, teacher_temp=0.04, update_centers=False)
        out.loss.backward()
    pretrainer.loss_fn.discard_pending_centers()
    student.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def run_variants(args, config, state, crops, accelerator, device, variants: list[str]) -> list[dict]:
    """Build every variant, warm each up, then time them step by step in turn (ours, reference, ours,
    ...), so that the ratio is not skewed by lazy initialisation or a load change on a shared
    machine. Before every step of every variant the RNG is re-seeded by the step, so all variants
    draw the same drop-path masks and their losses can be compared."""
    trainers, results = {}, {}
    for variant in variants:
        try:
            trainers[variant] = build_pretrainer(args, config, state, accelerator, device, variant)
            flops = count_step_flops(trainers[variant], crops) if not args.no_flops else None
            results[variant] = {"variant": variant, "flops_per_step": flops, "losses": [], "seconds": [], "cpu": []}
        except torch.OutOfMemoryError as err:
            _drop(trainers, results, variant, err, device)

    def step_once(variant: str, step: int, timed: bool) -> None:
        torch.manual_seed(args.seed + step)
        pretrainer, r = trainers[variant], results[variant]
        synchronize(device)
        if timed and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            out = pretrainer.train_step(crops, step)
            pretrainer.update_teacher(step)
            synchronize(device)
        except torch.OutOfMemoryError as err:
            _drop(trainers, results, variant, err, device)
            return
        if timed:
            r["seconds"].append(time.perf_counter() - start)
            r["cpu"].append(time.process_time() - cpu_start)
            if device.type == "cuda":
                r["peak"] = max(r.get("peak", 0), torch.cuda.max_memory_allocated(device))
        r["losses"].append(out.loss.item())
        r["skipped_steps"] = pretrainer.nonfinite_steps

    for step in range(args.warmup):
        for variant in list(trainers):
            step_once(variant, step, timed=False)
    with PeakRss() if device.type == "cpu" else contextlib.nullcontext() as rss:
        for step in range(args.warmup, args.warmup + args.steps):
            for variant in list(trainers):
                step_once(variant, step, timed=True)
    if args.profile and "ours" in trainers:
        write_profile(lambda: step_once("ours", args.warmup + args.steps, timed=False), device, args.profile)
    memory_kind = "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS of the timed steps"
    if len(variants) > 1:
        memory_kind += ", every variant resident"
    out = []
    for variant in variants:
        r = results[variant]
        if "error" in r:
            out.append(r)
            continue
        # the median step: robust to a shared machine's hiccups (every step is in the JSON too)
        seconds = sorted(r["seconds"])[len(r["seconds"]) // 2]
        flops = r["flops_per_step"]
        out.append(
            {
                "variant": variant,
                "images_per_s": args.batch / seconds,
                "ms_per_step": seconds * 1e3,
                "ms_per_step_mean": 1e3 * sum(r["seconds"]) / len(r["seconds"]),
                "ms_per_step_all": [round(1e3 * t, 2) for t in r["seconds"]],
                # CPU time of the process per step (all threads): on a shared CPU, less disturbed by
                # other jobs than the wall clock (with one thread it is the step's own compute)
                "cpu_ms_per_step": 1e3 * sorted(r["cpu"])[len(r["cpu"]) // 2],
                "peak_memory_gib": (r["peak"] if device.type == "cuda" else peak_memory_bytes(device, rss)) / 2**30,
                "peak_memory_kind": memory_kind,
                "flops_per_step": flops,
                "fraction_of_peak": flops / seconds / args.peak_flops if flops else None,
                "first_step_loss": r["losses"][0],
                "last_loss": r["losses"][-1],
                "skipped_steps": r["skipped_steps"],
            }
        )
    return out


def write_profile(step, device: torch.device, path: Path, rows: int = 30) -> None:
    """One more step of ours under `torch.profiler`; the ops with the most self time (grouped by
    input shapes) are printed and written to `path`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
    events = prof.key_averages(group_by_input_shape=True)
    key = "self_cpu_time_total"
    if device.type == "cuda":
        key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    table = events.table(sort_by=key, row_limit=rows, max_name_column_width=45, max_shapes_column_width=70)
    print(f"torch.profiler, one step of ours, by {key}:\n{table}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table + "\n")


def _drop(trainers: dict, results: dict, variant: str, err: Exception, device: torch.device) -> None:
    """Take a variant that ran out of memory out of the rotation and free what it held."""
    trainers.pop(variant, None)
    results[variant] = {"variant": variant, "error": f"out of memory: {str(err).splitlines()[0]}"}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="swin-tiny-w7")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="EsViTConfig overrides")
    parser.add_argument("--batch", type=int, default=64, help="images per step (per device)")
    parser.add_argument("--global-crops", type=int, default=2)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--out-dim", type=int, default=65536, help="K, prototypes of both heads")
    parser.add_argument("--view-only", action="store_true", help="DINO's loss: no region task")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile student (inductor) and teacher")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-flops", type=float, default=790e12, help="peak rate for the fraction (H200 bf16)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument(
        "--reference",
        choices=["none", "per-pair", "original-composition"],
        default="none",
        help="also time this composition in the same run and report ours / it",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minimal-accelerator", action="store_true", help="use the stand-in even with accelerate")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--profile", type=Path, default=None, help="profile one more step of ours; table here")
    args = parser.parse_args()

    if args.global_crops != 2:
        parser.error("EsViTPretrainer's teacher sees exactly 2 global crops (--global-crops 2)")
    device = torch.device(args.device)
    if device.type == "cuda":  # as run_pretraining.py does
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    overrides = {"head_out_dim": args.out_dim, **parse_overrides(args.set)}
    config = EsViTConfig.from_preset(args.preset, **overrides)
    accelerator, accelerator_name = make_accelerator(device, args.precision, args.compile, args.minimal_accelerator)
    torch.manual_seed(args.seed)
    state = EsViTForPreTraining(config).state_dict()
    g = torch.Generator().manual_seed(args.seed)
    sizes = [args.global_size] * args.global_crops + [args.local_size] * args.local_crops
    crops = [torch.randn(args.batch, 3, s, s, generator=g).to(device) for s in sizes]
    header = {
        "machine": describe_machine(device),
        "torch": torch.__version__,
        "accelerator": accelerator_name,
        "preset": args.preset,
        "overrides": dict(overrides),
        "batch": args.batch,
        "crops": f"{args.global_crops}x{args.global_size} + {args.local_crops}x{args.local_size}",
        "out_dim": args.out_dim,
        "region_task": not args.view_only,
        "precision": args.precision,
        "tf32": device.type == "cuda",
        "compile": args.compile,
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_flops": args.peak_flops,
    }
    print(json.dumps(header))
    variants = ["ours"] + ([args.reference] if args.reference != "none" else [])
    results = run_variants(args, config, state, crops, accelerator, device, variants)
    for r in results:
        if "error" in r:
            print(f"{r['variant']:>20}: {r['error']}")
            continue
        frac = f"{100 * r['fraction_of_peak']:.1f}% of peak" if r["fraction_of_peak"] else "no FLOP count"
        flops = f"{r['flops_per_step'] / 1e12:.3f} TFLOP/step" if r["flops_per_step"] else ""
        print(
            f"{r['variant']:>20}: {r['images_per_s']:8.1f} img/s | {r['ms_per_step']:8.1f} ms/step "
            f"({r['cpu_ms_per_step']:.0f} ms CPU time) | peak "
            f"{r['peak_memory_gib']:6.2f} GiB ({r['peak_memory_kind']}) | {flops} {frac} | "
            f"first loss {r['first_step_loss']:.7f}"
        )
    summary = {**header, "results": results}
    if len(results) == 2 and all("error" not in r for r in results):
        ours, ref = results
        summary["speedup_vs_reference"] = ref["ms_per_step"] / ours["ms_per_step"]
        summary["first_loss_rel_diff"] = abs(ours["first_step_loss"] - ref["first_step_loss"]) / abs(
            ref["first_step_loss"]
        )
        print(
            f"ours vs {ref['variant']}: {summary['speedup_vs_reference']:.3f}x faster per step, peak memory "
            f"{ours['peak_memory_gib']:.2f} vs {ref['peak_memory_gib']:.2f} GiB, first-step loss rel diff "
            f"{summary['first_loss_rel_diff']:.2e}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if hasattr(accelerator, "end_training"):
        accelerator.end_training()


if __name__ == "__main__":
    main()
