"""Resumable checkpoints of a pretraining run, written and read without running code from disk.

A checkpoint is a folder `checkpoints/step_XXXXXXXX/` holding:

| file | written by | format |
|---|---|---|
| `model.safetensors` (student), `optimizer.bin`, `random_states_<rank>.pkl`, `scaler.pt` (fp16) | `accelerator.save_state` | safetensors / torch.save of tensors, numbers and numpy RNG arrays |
| `teacher.safetensors`, `loss.safetensors` (centres) | here | safetensors |
| `trainer_state.json`, `data_position_rank<rank>.json` | here | JSON |
| `checkpoint_complete.json` | here, last | JSON; a folder without it was cut short and is never used |

Why not `accelerator.register_for_checkpointing`: accelerate writes registered objects as
`custom_checkpoint_<i>.pkl` and unpickles them with `weights_only=False` on resume, so a file
planted in a checkpoint folder (shared storage, a downloaded run) would run its code. Here every
file of a folder is checked before anything is loaded: a name outside the table above, or a
torch-serialised file that does not load with `torch.load(weights_only=True)` (tensors, numbers
and the numpy RNG state only), stops the resume with an error naming the file, and nothing is
written. The weights are checked to be finite before a checkpoint is written; a failed write
(e.g. a full disk) removes its partial folder and leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
TEACHER_FILE = "teacher.safetensors"
LOSS_FILE = "loss.safetensors"
STATE_FILE = "trainer_state.json"
POSITION_FILE = "data_position_rank{rank}.json"

#: Files a checkpoint folder may hold (regular expressions over the file name).
ALLOWED_FILES = (
    r"model(_\d+)?\.safetensors",
    r"optimizer(_\d+)?\.bin",
    r"scheduler(_\d+)?\.bin",
    r"sampler(_\d+)?\.bin",
    r"dl_state_dict(_\d+)?\.bin",
    r"random_states_\d+\.pkl",
    r"scaler\.pt",
    re.escape(TEACHER_FILE),
    re.escape(LOSS_FILE),
    re.escape(STATE_FILE),
    r"data_position_rank\d+\.json",
    re.escape(COMPLETE_MARKER),
)
#: Of those, the files in torch's pickle-based format (read with weights-only loading).
TORCH_PICKLE_SUFFIXES = (".bin", ".pkl", ".pt")
#: Folders a checkpoint may hold (written by `--save_models_at_checkpoints`; never loaded on resume).
ALLOWED_FOLDERS = ("model", "pretraining")


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint folder holds a file that is not ours or could run code when loaded."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (its partial folder has been removed)."""


@dataclass
class TrainerState:
    """Run-wide counters of a checkpoint (`trainer_state.json`)."""

    global_step: int = 0
    num_processes: int = 1
    global_batch_size: int = 0
    nonfinite_steps: int = 0


@dataclass
class DataPosition:
    """Where one process is in its data; saved per process, because stream shards differ."""

    epoch: int = 0
    batches_done: int = 0  # batches of `epoch` already trained on
    images_seen: int = 0
    skipped_images: int = 0


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.split("_")[-1])


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if (p / COMPLETE_MARKER).is_file()]
    return sorted(done, key=checkpoint_step)


def resolve_checkpoint(value: str | None, root: Path) -> Path | None:
    """The folder to resume from: `latest` is the newest complete one under `root`, or None when
    there is none yet (a first start: the same command serves the first start and every restart)."""
    if value is None:
        return None
    if value == "latest":
        found = list_checkpoints(root)
        if not found:
            logger.info("--resume_from_checkpoint latest: no checkpoint under %s yet, starting a new run.", root)
            return None
        return found[-1]
    folder = Path(value)
    if not (folder / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"{folder} is not a complete checkpoint (no {COMPLETE_MARKER}).")
    return folder


# ----------------------------------------------------------------------------------------- checks
def _weights_only_load(path: Path):
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


def verify_checkpoint_folder(folder: Path) -> None:
    """Refuse a folder holding anything but our files, or a torch file that is not plain data.

    Every torch-serialised file is read with `torch.load(weights_only=True)`: unpickling is then
    limited to tensors, containers, numbers and numpy's RNG arrays, so a crafted pickle raises
    instead of running. Raises `UnsafeCheckpointError` naming the file.
    """
    for path in sorted(folder.iterdir()):
        if path.is_dir():
            if path.name not in ALLOWED_FOLDERS:
                raise UnsafeCheckpointError(
                    f"{path} is not part of an esvit checkpoint: refusing to resume from {folder}."
                )
            continue
        if not any(re.fullmatch(pattern, path.name) for pattern in ALLOWED_FILES):
            raise UnsafeCheckpointError(
                f"{path} is not part of an esvit checkpoint (unknown file): refusing to resume from {folder}."
            )
        if path.suffix in TORCH_PICKLE_SUFFIXES:
            try:
                _weights_only_load(path)
            except Exception as err:
                raise UnsafeCheckpointError(
                    f"{path} does not load as plain tensors and numbers (torch.load(weights_only=True) refused it: "
                    f"{type(err).__name__}): refusing to resume from {folder}. Nothing was loaded."
                ) from None


def assert_finite(*modules: torch.nn.Module) -> None:
    """Raise when any parameter or buffer of `modules` holds a NaN or an infinity."""
    for module in modules:
        tensors = [t for t in module.state_dict().values() if t.is_floating_point()]
        if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            raise FloatingPointError(f"{type(module).__name__} has non-finite weights: no checkpoint is written.")


# ----------------------------------------------------------------------------------------- save
def save_checkpoint(
    accelerator,
    root: Path,
    state: TrainerState,
    position: DataPosition,
    pretrainer,
    keep: int | None,
) -> Path:
    """Write `root/step_<global_step>` (see the module docstring); the marker comes last, then the
    oldest complete checkpoints beyond `keep` are removed. On failure the partial folder is removed
    and `CheckpointWriteError` says why (for a full disk: how much space the folder needs)."""
    folder = root / f"step_{state.global_step:08d}"
    teacher, loss_fn = pretrainer.teacher, pretrainer.loss_fn
    assert_finite(pretrainer.unwrapped_student, teacher, loss_fn)
    error: BaseException | None = None
    try:
        accelerator.save_state(str(folder))
        if accelerator.is_main_process:
            save_file(_plain_state(teacher), str(folder / TEACHER_FILE))
            save_file(_plain_state(loss_fn), str(folder / LOSS_FILE))
            (folder / STATE_FILE).write_text(json.dumps(asdict(state)))
        (folder / POSITION_FILE.format(rank=accelerator.process_index)).write_text(json.dumps(asdict(position)))
        failed = torch.zeros((), device=accelerator.device)
    except Exception as err:  # OSError, torch's RuntimeError, safetensors' SafetensorError on a full disk, ...
        logger.error("Writing %s failed on process %d: %s", folder, accelerator.process_index, err)
        failed = torch.ones((), device=accelerator.device)
        error = err
    if float(accelerator.reduce(failed, reduction="sum")) > 0:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)
        raise CheckpointWriteError(_write_failure_message(folder, teacher, error)) from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (folder / COMPLETE_MARKER).write_text(json.dumps({"global_step": state.global_step}))
        if keep is not None:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return folder


def _plain_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _write_failure_message(folder: Path, teacher: torch.nn.Module, error: BaseException | None) -> str:
    # student + teacher weights and AdamW's two moments: about four copies of the parameters
    needed = 4 * sum(t.numel() * t.element_size() for t in teacher.state_dict().values())
    try:
        free = shutil.disk_usage(folder.parent if folder.parent.exists() else folder.parent.parent).free
    except OSError:
        free = None
    no_space = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or (free is not None and free < needed)
    what = "no space left on the device" if no_space else f"{type(error).__name__}: {error}"
    room = f"; {free / 2**20:.1f} MiB free" if free is not None else ""
    return (
        f"could not write the checkpoint {folder} ({what}): it needs about {needed / 2**20:.1f} MiB{room}. "
        "The partial folder was removed; earlier checkpoints are intact."
    )


# ----------------------------------------------------------------------------------------- load
def load_checkpoint(accelerator, folder: Path, pretrainer) -> tuple[TrainerState, DataPosition]:
    """Verify `folder`, then restore student, optimizer, RNG, teacher and centres from it."""
    verify_checkpoint_folder(folder)
    teacher, loss_fn = pretrainer.teacher, pretrainer.loss_fn
    rng_file = folder / f"random_states_{accelerator.process_index}.pkl"
    if not rng_file.is_file():
        logger.warning(
            "%s is missing (the checkpoint was written by fewer processes): this process's random state "
            "starts anew, so the run is no longer exactly reproducible.",
            rng_file,
        )
    accelerator.load_state(str(folder))
    teacher.load_state_dict(load_file(str(folder / TEACHER_FILE), device=str(accelerator.device)), strict=True)
    loss_fn.load_state_dict(load_file(str(folder / LOSS_FILE), device=str(accelerator.device)), strict=True)
    state = TrainerState(**json.loads((folder / STATE_FILE).read_text()))
    path = folder / POSITION_FILE.format(rank=accelerator.process_index)
    if not path.is_file():
        # More processes than when the checkpoint was written: follow process 0.
        logger.warning("%s missing; this process follows process 0's data position.", path.name)
        path = folder / POSITION_FILE.format(rank=0)
    position = DataPosition(**json.loads(path.read_text()))
    if state.num_processes != accelerator.num_processes:
        logger.warning(
            "The checkpoint was written by %d processes and is resumed by %d: the global batch changes "
            "(the learning rate follows it) and the data order differs from an uninterrupted run. To resume "
            "exactly, launch as many processes (on CPU: accelerate launch --multi_gpu --num_processes N "
            "--num_machines 1 run_pretraining.py --cpu ...).",
            state.num_processes,
            accelerator.num_processes,
        )
    return state, position


__all__ = [
    "COMPLETE_MARKER",
    "CheckpointWriteError",
    "DataPosition",
    "TrainerState",
    "UnsafeCheckpointError",
    "assert_finite",
    "list_checkpoints",
    "load_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
    "verify_checkpoint_folder",
]
