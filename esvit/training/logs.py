"""Console logging and trackers of a pretraining run.

Log records go through `tqdm.write`, so they never glue onto the progress bar; accelerate's
per-checkpoint INFO lines (model, optimizer, RNG "saved in ...") are lowered to warnings only.
"""

from __future__ import annotations

import logging
import os
import time

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

#: Loggers whose INFO lines repeat at every checkpoint.
QUIET_LOGGERS = ("accelerate.checkpointing", "accelerate.accelerator", "accelerate.utils.other")


class TqdmHandler(logging.Handler):
    """A logging handler that prints above an active tqdm bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record))
        except Exception:
            self.handleError(record)


def configure_logging(is_local_main_process: bool) -> None:
    """INFO on the local main process, warnings elsewhere; accelerate's checkpoint chatter off."""
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    # Replace console handlers (ours from an earlier call, basicConfig's); keep others (files, test capture).
    console = (TqdmHandler, logging.StreamHandler)
    root.handlers = [h for h in root.handlers if type(h) not in console] + [handler]
    root.setLevel(logging.INFO if is_local_main_process else logging.WARNING)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def trackers(report_to: str) -> list[str] | str | None:
    """`--report_to` as accelerate's `log_with`; tensorboard is dropped (with a warning) if missing."""
    if report_to in ("none", ""):
        return None
    if report_to == "all":
        return "all"
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    if "tensorboard" in names:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            logging.getLogger(__name__).warning("tensorboard is not installed: not logging to it.")
            names.remove("tensorboard")
    return names or None


def default_mixed_precision(args) -> str | None:
    """`--mixed_precision`, else bf16 on a GPU that supports it (unless an accelerate launch config
    chose), else accelerate's own default."""
    if args.mixed_precision is not None or os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return args.mixed_precision
    import torch

    if not args.cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        logger.info("No --mixed_precision given: training in bf16 on this GPU.")
        return "bf16"
    return None


def worker_count(requested: int, accelerator) -> int:
    """DataLoader workers per process, at most the cores each process can use (minus its own)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    available = max(0, cores // max(1, accelerator.num_processes) - 1)
    if requested > available:
        logger.info(
            "%d DataLoader workers requested, %d cores per process here: using %d.", requested, cores, available
        )
        return available
    return requested


def warn_if_fewer_processes_than_launched(accelerator) -> None:
    """`accelerate launch --num_processes N --cpu` silently starts ONE process; say so."""
    try:
        import psutil

        command = psutil.Process().parent().cmdline()
    except Exception:
        return
    if "--num_processes" not in command or not any("accelerate" in part for part in command):
        return
    try:
        asked = int(command[command.index("--num_processes") + 1])
    except (IndexError, ValueError):
        return
    if asked > accelerator.num_processes:
        logger.warning(
            "accelerate launch was asked for %d processes but started %d. On CPU, a real multi-process run "
            "needs: accelerate launch --multi_gpu --num_processes %d --num_machines 1 --mixed_precision no "
            "--dynamo_backend no run_pretraining.py --cpu ...",
            asked,
            accelerator.num_processes,
            asked,
        )


class EtaReporter:
    """Logs the plan's expected duration once, after the first `after` optimizer steps."""

    def __init__(self, total_steps: int, start_step: int, global_batch: int, after: int = 10):
        self.total, self.start, self.batch = total_steps, start_step, global_batch
        self.after = min(after, max(1, total_steps - start_step))
        self.began = time.perf_counter()
        self.done = False

    def update(self, step: int) -> None:
        if self.done or step - self.start < self.after:
            return
        self.done = True
        per_step = (time.perf_counter() - self.began) / (step - self.start)
        remaining = per_step * (self.total - step)
        logger.info(
            "Plan: %d optimizer steps of %d images at %.2f s/step (%.0f images/s): about %s left.",
            self.total,
            self.batch,
            per_step,
            self.batch / per_step if per_step > 0 else float("inf"),
            _duration(remaining),
        )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


__all__ = [
    "EtaReporter",
    "TqdmHandler",
    "configure_logging",
    "default_mixed_precision",
    "trackers",
    "warn_if_fewer_processes_than_launched",
    "worker_count",
]
