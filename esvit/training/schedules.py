"""Per-step schedules of EsViT / DINO pretraining, precomputed as arrays.

DINO (Caron et al., ICCV 2021, §3 and appendix) and EsViT (arXiv:2106.09785) train with
* a learning rate warmed up linearly to `base_lr * global_batch / 256` (the linear scaling rule of
  Goyal et al., 2017), then decayed with a half cosine to `min_lr`;
* a weight decay following a cosine from 0.04 to 0.4;
* a teacher EMA momentum following a cosine from 0.996 to 1;
* a teacher temperature warmed up linearly per epoch (0.04 -> 0.07 over 30 epochs for the released
  Swin models), then constant.

Every array is indexed by the global optimizer step, so a training loop only reads
`schedules.lr[step]`. The values equal those of the original implementation to the last bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LR_REFERENCE_BATCH_SIZE = 256


def cosine_schedule(
    base_value: float,
    final_value: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start_value: float = 0.0,
) -> np.ndarray:
    """Linear warm-up from `warmup_start_value` to `base_value`, then a half cosine to `final_value`.

    `[total_steps]` float64. The warm-up is `np.linspace(start, base, warmup_steps)` (so its last
    step already equals `base_value`); the cosine part runs over the remaining `R` steps as
    `final + (base - final) * (1 + cos(pi * i / R)) / 2`, i = 0 .. R-1, so it never quite reaches
    `final_value`. `total_steps = epochs * steps_per_epoch` reproduces the original per-epoch API.
    """
    if total_steps < 0 or warmup_steps < 0:
        raise ValueError(f"total_steps and warmup_steps must be >= 0, got {total_steps}, {warmup_steps}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) exceeds total_steps ({total_steps})")
    warmup = np.linspace(warmup_start_value, base_value, warmup_steps) if warmup_steps > 0 else np.array([])
    decay_steps = total_steps - warmup_steps
    # Scalar math.cos (not np.cos) keeps every value bit-identical to the reference, whose numbers
    # were produced this way; numpy's vectorised cos may differ in the last bit on some CPUs.
    half_range = 0.5 * (base_value - final_value)
    decay = np.array(
        [final_value + half_range * (1 + math.cos(math.pi * i / decay_steps)) for i in range(decay_steps)],
        dtype=np.float64,
    )
    return np.concatenate((warmup, decay))


def teacher_temp_schedule(warmup_value: float, final_value: float, warmup_length: int, total_length: int) -> np.ndarray:
    """Linear warm-up over `warmup_length` entries (inclusive of both ends), then constant.

    `[total_length]` float64. The original counts both lengths in epochs; `build_schedules`
    repeats each epoch's value over its steps.
    """
    if not 0 <= warmup_length <= total_length:
        raise ValueError(f"need 0 <= warmup_length ({warmup_length}) <= total_length ({total_length})")
    return np.concatenate(
        (
            np.linspace(warmup_value, final_value, warmup_length),
            np.ones(total_length - warmup_length) * final_value,
        )
    )


@dataclass(frozen=True)
class PretrainingSchedules:
    """Arrays of length `total_steps`, indexed by the global optimizer step.

    Attributes:
        lr: learning rate of every parameter group.
        weight_decay: weight decay of the regularised group (group 0; group 1 keeps 0).
        teacher_momentum: EMA momentum of the teacher update after the step.
        teacher_temp: teacher temperature of the loss at the step.
    """

    lr: np.ndarray
    weight_decay: np.ndarray
    teacher_momentum: np.ndarray
    teacher_temp: np.ndarray

    def __len__(self) -> int:
        return len(self.lr)

    def at(self, step: int) -> dict[str, float]:
        """The four values of `step`, as floats (for logging)."""
        return {
            "lr": float(self.lr[step]),
            "weight_decay": float(self.weight_decay[step]),
            "teacher_momentum": float(self.teacher_momentum[step]),
            "teacher_temp": float(self.teacher_temp[step]),
        }


def build_schedules(
    *,
    epochs: int,
    steps_per_epoch: int,
    global_batch_size: int,
    base_lr: float = 5e-4,
    min_lr: float = 1e-6,
    warmup_epochs: int = 10,
    weight_decay: float = 0.04,
    weight_decay_end: float = 0.4,
    momentum_teacher: float = 0.996,
    warmup_teacher_temp: float = 0.04,
    teacher_temp: float = 0.04,
    warmup_teacher_temp_epochs: int = 0,
) -> PretrainingSchedules:
    """All four schedules for `epochs * steps_per_epoch` optimizer steps (original defaults).

    `base_lr` is the rate for a global batch of 256 and is scaled linearly by
    `global_batch_size / 256` (all processes, per optimizer step). For a stream without a length,
    choose `steps_per_epoch` so that `epochs * steps_per_epoch` is the planned number of steps;
    an "epoch" then only sets the granularity of the warm-ups and of the teacher temperature.
    """
    if epochs < 1 or steps_per_epoch < 1 or global_batch_size < 1:
        raise ValueError(
            f"epochs, steps_per_epoch and global_batch_size must be >= 1, got "
            f"{epochs}, {steps_per_epoch}, {global_batch_size}"
        )
    total = epochs * steps_per_epoch
    peak_lr = base_lr * global_batch_size / LR_REFERENCE_BATCH_SIZE
    per_epoch_temp = teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, epochs)
    return PretrainingSchedules(
        lr=cosine_schedule(peak_lr, min_lr, total, warmup_steps=warmup_epochs * steps_per_epoch),
        weight_decay=cosine_schedule(weight_decay, weight_decay_end, total),
        teacher_momentum=cosine_schedule(momentum_teacher, 1.0, total),
        teacher_temp=np.repeat(per_epoch_temp, steps_per_epoch),
    )


def steps_from_epochs(epochs: float, steps: int | None, steps_per_epoch: int | None) -> int | None:
    """An epoch-denominated length in optimizer steps: `steps` when given, 0 for 0 epochs, None
    when it cannot be known (a stream of unknown length)."""
    if steps is not None:
        return steps
    if epochs == 0:
        return 0
    return None if steps_per_epoch is None else round(epochs * steps_per_epoch)


@dataclass(frozen=True)
class TrainingPlan:
    """The optimizer-step plan of one run.

    Attributes:
        schedules: per-step lr, weight decay, teacher momentum and temperature.
        total_steps: optimizer steps of the whole run.
        freeze_last_layer_steps: steps during which the heads' last layers get no update.
        epoch_based: True when the schedules are the original's per-epoch ones, bit for bit.
    """

    schedules: PretrainingSchedules
    total_steps: int
    freeze_last_layer_steps: int
    epoch_based: bool


def plan_training(args, steps_per_epoch: int | None, global_batch_size: int) -> TrainingPlan:
    """Choose and build the schedules of a run from its `PretrainingArguments`.

    With a known epoch length and whole-epoch warm-ups, the schedules are the original's
    (per-epoch teacher-temperature steps). Otherwise (`max_train_steps`, `*_steps` values, or
    fractional epochs) every schedule spans exactly `total_steps` optimizer steps, warm-ups are
    counted in steps and the teacher temperature rises per step. Every epoch-denominated argument
    that a stream of unknown length cannot convert is named in one error.
    """
    epoch_args = {
        "warmup": (args.warmup_epochs, args.warmup_steps),
        "warmup_teacher_temp": (args.warmup_teacher_temp_epochs, args.warmup_teacher_temp_steps),
        "freeze_last_layer": (args.freeze_last_layer_epochs, args.freeze_last_layer_steps),
    }
    lengths = {name: steps_from_epochs(e, s, steps_per_epoch) for name, (e, s) in epoch_args.items()}
    unknown = [name for name, value in lengths.items() if value is None]
    if args.max_train_steps is None and steps_per_epoch is None:
        unknown.insert(0, "num_train")
    if unknown:
        wanted = ", ".join(
            "--max_train_steps (instead of --num_train_epochs)"
            if n == "num_train"
            else f"--{n}_steps (or 0 --{n}_epochs)"
            for n in unknown
        )
        raise ValueError(f"the data has no known length, so epochs cannot be converted to steps: give {wanted}.")
    total_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    common = dict(
        global_batch_size=global_batch_size,
        base_lr=args.learning_rate,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        weight_decay_end=args.weight_decay_end,
        momentum_teacher=args.momentum_teacher,
        warmup_teacher_temp=args.warmup_teacher_temp,
        teacher_temp=args.teacher_temp,
    )
    epoch_based = (
        args.max_train_steps is None
        and args.warmup_steps is None
        and args.warmup_teacher_temp_steps is None
        and float(args.warmup_epochs).is_integer()
        and float(args.warmup_teacher_temp_epochs).is_integer()
    )
    if epoch_based:
        schedules = build_schedules(
            epochs=args.num_train_epochs,
            steps_per_epoch=steps_per_epoch,
            warmup_epochs=int(args.warmup_epochs),
            warmup_teacher_temp_epochs=int(args.warmup_teacher_temp_epochs),
            **common,
        )
    else:
        schedules = build_schedules(
            epochs=total_steps,
            steps_per_epoch=1,
            warmup_epochs=min(lengths["warmup"], total_steps),
            warmup_teacher_temp_epochs=min(lengths["warmup_teacher_temp"], total_steps),
            **common,
        )
    return TrainingPlan(schedules, total_steps, lengths["freeze_last_layer"], epoch_based)


__all__ = [
    "TrainingPlan",
    "plan_training",
    "steps_from_epochs",
    "LR_REFERENCE_BATCH_SIZE",
    "PretrainingSchedules",
    "build_schedules",
    "cosine_schedule",
    "teacher_temp_schedule",
]
