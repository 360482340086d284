"""One EsViT training step as an object: `EsViTPretrainer`.

EsViT (Li et al., ICLR 2022, arXiv:2106.09785, Algorithm 1) follows DINO's loop: the EMA teacher
sees the 2 global crops, the student all crops; the loss (view + region self-distillation) is
back-propagated into the student only; after each optimizer step the teacher moves towards the
student and the centres towards the teacher's batch means. `EsViTPretrainer` owns student,
teacher, loss and optimizer and exposes exactly these two halves:

* `train_step(crops, step)`: teacher forward, student forward, loss, backward under
  `accelerator.accumulate`; on the last micro-batch of an optimizer step the schedules are applied
  (lr, weight decay), gradients unscaled and clipped, the heads' last layers frozen early on, and
  the optimizer stepped. Returns detached metrics (tensors, no host sync).
* `update_teacher(step)`: the centre update and the EMA of the teacher, once per optimizer step.

A step whose loss or gradient norm is not finite is skipped whole: no optimizer step, no EMA, no
centre update; it is counted and named in the log, and after `max_consecutive_nonfinite` such
steps in a row the run stops with `NonFiniteLossError` naming the first of them. Deciding this
costs one host sync of a single boolean per optimizer step, as torch's `GradScaler` does; under
fp16 loss scaling the scaler itself skips steps with overflowing gradients (and lowers its scale),
so only a non-finite loss counts as bad there.

Prior art: DINO's `train_one_epoch`, DINOv2's `SSLMetaArch.forward_backward` / `update_teacher`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .koleo import koleo_per_crop
from .loss import EsViTLoss, EsViTLossOutput
from .optim import cancel_last_layer_gradients, clip_gradients, update_teacher
from .schedules import TrainingPlan

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass
class StepOutput:
    """What one micro-batch of `train_step` reports (every tensor detached, on the device).

    Attributes:
        loss / view_loss / region_loss: the loss and its parts (region None without the task).
        koleo_loss: the KoLeo term before its weight (None when its weight is 0).
        teacher_entropy / teacher_region_entropy: mean entropies of the teacher targets.
        num_images: images in the micro-batch.
        optimizer_step: True on the last micro-batch of an optimizer step (then `update_teacher`
            must follow); False while gradients accumulate.
        skipped: True when this optimizer step was skipped as non-finite.
    """

    loss: torch.Tensor
    view_loss: torch.Tensor
    region_loss: torch.Tensor | None
    koleo_loss: torch.Tensor | None
    teacher_entropy: torch.Tensor
    teacher_region_entropy: torch.Tensor | None
    num_images: int
    optimizer_step: bool
    skipped: bool = False


class EsViTPretrainer:
    """Student, EMA teacher, loss and optimizer of one EsViT run, and the step that trains them.

    Args:
        accelerator: the run's `accelerate.Accelerator` (gradient accumulation and mixed precision
            are its settings).
        student: the student, already `accelerator.prepare`d (possibly DDP-wrapped / compiled).
        teacher: the teacher `EsViTForPreTraining`, on the device, never prepared.
        loss_fn: the `EsViTLoss` (its centres are updated in `update_teacher`).
        optimizer: the prepared optimizer over the student's parameter groups.
        plan: schedules and step counts (`schedules.plan_training`).
        clip_grad / clip_grad_mode: gradient clipping threshold (0: none) and mode.
        max_consecutive_nonfinite: bad optimizer steps in a row before the run stops.
        teacher_forward: what to call for the teacher's forward (e.g. `torch.compile(teacher)`);
            the teacher itself by default.
        global_batch_size: images per optimizer step over all processes (for reports).
        koleo_weight: weight of the KoLeo regulariser on the student's pooled features of each
            global crop (DINOv2's 0.1); 0 (the default) leaves the original's objective.
    """

    def __init__(
        self,
        accelerator,
        student: nn.Module,
        teacher: nn.Module,
        loss_fn: EsViTLoss,
        optimizer: torch.optim.Optimizer,
        plan: TrainingPlan,
        clip_grad: float = 3.0,
        clip_grad_mode: str = "per_param",
        max_consecutive_nonfinite: int = 20,
        teacher_forward=None,
        global_batch_size: int | None = None,
        koleo_weight: float = 0.0,
    ):
        self.accelerator = accelerator
        self.student = student
        self.unwrapped_student = accelerator.unwrap_model(student, keep_torch_compile=False)
        self.teacher = teacher
        self.teacher_forward = teacher if teacher_forward is None else teacher_forward
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.plan = plan
        self.clip_grad = clip_grad
        self.clip_grad_mode = clip_grad_mode
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.global_batch_size = global_batch_size  # images per optimizer step, all processes
        self.koleo_weight = koleo_weight
        self.config = self.unwrapped_student.config
        self.nonfinite_steps = 0  # skipped optimizer steps, this process's run so far
        self.consecutive_nonfinite = 0
        self.first_bad_step: int | None = None  # 1-based, like the logged step numbers
        self._finite: torch.Tensor | None = None  # all micro-batch losses of this step finite
        self._last_step_ok = True

    # ------------------------------------------------------------------------------ the step
    def train_step(self, crops: list[torch.Tensor], step: int) -> StepOutput:
        """Forward, loss and backward of one micro-batch; the optimizer step on the last one.

        Args:
            crops: `[global_1, global_2, local_1, ...]`, each `[B, 3, h, w]`, on the device.
            step: the global optimizer step this micro-batch belongs to (indexes the schedules).
        """
        accelerator, schedules = self.accelerator, self.plan.schedules
        with accelerator.accumulate(self.student):
            region = self.loss_fn.use_region_loss  # view-only (DINO) training runs no region head
            with torch.no_grad(), accelerator.autocast():
                teacher_out = self.teacher_forward(crops[:2], compute_region=region)  # the global crops
            student_out = self.student(crops, compute_region=region)
            # the centres move in update_teacher, once per optimizer step (and not at all if it is skipped)
            out = self.loss_fn(
                student_out, teacher_out, teacher_temp=float(schedules.teacher_temp[step]), update_centers=False
            )
            loss, koleo = out.loss, None
            if self.koleo_weight:
                batch = crops[0].shape[0]
                koleo = koleo_per_crop(student_out.pooler_output[: 2 * batch], num_crops=2)  # the global crops
                loss = loss + self.koleo_weight * koleo
                koleo = koleo.detach()
            accelerator.backward(loss)
            finite = torch.isfinite(loss.detach())
            self._finite = finite if self._finite is None else self._finite & finite
            skipped = False
            if accelerator.sync_gradients:
                skipped = not self._optimizer_step(step)
        return self._step_output(out, loss, koleo, crops[0].shape[0], accelerator.sync_gradients, skipped)

    def _optimizer_step(self, step: int) -> bool:
        """Schedules, clipping, freeze, optimizer step; False when the step was skipped."""
        schedules = self.plan.schedules
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(schedules.lr[step])
            if i == 0:  # only the first group is regularised
                group["weight_decay"] = float(schedules.weight_decay[step])
        ok = self._finite
        self._finite = None
        scaled = self.accelerator.scaler is not None
        if self.clip_grad:
            self.accelerator.unscale_gradients()
            norms = clip_gradients(self.unwrapped_student, self.clip_grad, mode=self.clip_grad_mode)
            if not scaled and norms.numel():
                ok = ok & torch.isfinite(norms).all()
        elif not scaled:
            grads = [p.grad for p in self.unwrapped_student.parameters() if p.grad is not None]
            if grads:
                ok = ok & torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
        cancel_last_layer_gradients(self.unwrapped_student, step, self.plan.freeze_last_layer_steps)
        self._last_step_ok = bool(ok)  # the one host sync of the step
        if self._last_step_ok or scaled:
            # under loss scaling the scaler skips overflowing steps itself and lowers its scale
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._count(step)
        return self._last_step_ok

    def _count(self, step: int) -> None:
        if self._last_step_ok:
            self.consecutive_nonfinite = 0
            return
        self.nonfinite_steps += 1
        self.consecutive_nonfinite += 1
        if self.consecutive_nonfinite == 1:
            self.first_bad_step = step + 1  # counted from 1, as the progress bar and step_N checkpoints
        logger.warning(
            "Step %d has a non-finite loss or gradient: skipped (no update of student, teacher or centres; "
            "%d skipped in a row).",
            step + 1,
            self.consecutive_nonfinite,
        )
        if self.consecutive_nonfinite >= self.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite} optimizer steps in a row had a non-finite loss or gradient, the "
                f"first at step {self.first_bad_step}: lower the learning rate, raise the teacher temperature "
                "warm-up, or use --mixed_precision bf16 / no. No checkpoint holds the non-finite state."
            )

    @torch.no_grad()
    def update_teacher(self, step: int) -> None:
        """Centres and EMA teacher after the optimizer step `step` (skipped with a skipped step)."""
        if not self._last_step_ok:
            self.loss_fn.discard_pending_centers()
            return
        self.loss_fn.step_centers()
        update_teacher(self.unwrapped_student, self.teacher, float(self.plan.schedules.teacher_momentum[step]))

    @staticmethod
    def _step_output(
        out: EsViTLossOutput, loss, koleo, num_images: int, optimizer_step: bool, skipped: bool
    ) -> StepOutput:
        return StepOutput(
            loss=loss.detach(),
            view_loss=out.view_loss,
            region_loss=out.region_loss,
            koleo_loss=koleo,
            teacher_entropy=out.teacher_view_entropy,
            teacher_region_entropy=out.teacher_region_entropy,
            num_images=num_images,
            optimizer_step=optimizer_step,
            skipped=skipped,
        )


__all__ = ["EsViTPretrainer", "NonFiniteLossError", "StepOutput"]
