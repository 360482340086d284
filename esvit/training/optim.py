"""Optimizer-side helpers of EsViT / DINO pretraining.

* `get_param_groups`: weight decay on weight matrices only (DINO, Caron et al. 2021, appendix);
* `build_optimizer`: AdamW over those groups, fused into one kernel where the device has one;
* `clip_gradients`: per-parameter gradient-norm clipping, as the original trains (max 3.0);
* `cancel_last_layer_gradients`: keep the prototype layer of both heads fixed during the first
  steps, which DINO found stabilises the start of training;
* `update_teacher`: the momentum (EMA) teacher, `teacher <- m * teacher + (1 - m) * student`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


def get_param_groups(model: nn.Module) -> list[dict]:
    """Two AdamW groups: `[regularised, not regularised (weight_decay=0)]`.

    Biases (names ending in `.bias`) and every 1-D tensor (norm scales, ...) get no weight decay;
    all other trainable tensors do, including relative-position tables and the head's
    `last_layer.weight_g` (shape `[K, 1]`), exactly as in the original. Frozen parameters
    (`requires_grad=False`) are left out. The schedule sets the decay of group 0 at every step.
    """
    regularized: list[nn.Parameter] = []
    not_regularized: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def build_optimizer(param_groups: list[dict], implementation: str, device: torch.device) -> torch.optim.AdamW:
    """AdamW (the original's optimizer; lr and weight decay are set by the schedules every step).

    `implementation`: "fused" (torch's single-kernel AdamW: one launch for all parameters instead of
    several per parameter group), "foreach" (multi-tensor ops, torch's default) or "auto" (fused on
    CUDA, where it pays; foreach elsewhere). The update is the same up to float rounding.
    """
    if implementation not in ("auto", "fused", "foreach"):
        raise ValueError(f"unknown optimizer implementation {implementation!r}: use auto, fused or foreach")
    fused = implementation == "fused" or (implementation == "auto" and torch.device(device).type == "cuda")
    return torch.optim.AdamW(param_groups, fused=fused, foreach=None if fused else True)


@torch.no_grad()
def clip_gradients(
    model: nn.Module, max_norm: float, mode: Literal["per_param", "global"] = "per_param"
) -> torch.Tensor:
    """Clip gradient norms in place; return the norms before clipping.

    `per_param` (default, the original's behaviour): each parameter's gradient is scaled by
    `max_norm / (||g|| + 1e-6)` when that factor is below 1, independently of the others; returns
    a `[num_params_with_grad]` tensor of norms. This is not `clip_grad_norm_`: a single large
    gradient does not shrink the others. `global`: `torch.nn.utils.clip_grad_norm_` over all
    gradients; returns the total norm (0-d). Neither mode synchronises with the device per tensor.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if mode == "global":
        return torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    if mode != "per_param":
        raise ValueError(f"mode must be 'per_param' or 'global', got {mode!r}")
    if not grads:
        return torch.zeros(0)
    norms = torch._foreach_norm(grads, 2)
    # Factors of exactly 1 leave a gradient bit-identical, so multiplying every gradient equals
    # the original's "scale only when the factor is below 1".
    factors = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, factors)
    return torch.stack([n.float() for n in norms])  # [num_params_with_grad]


def cancel_last_layer_gradients(model: nn.Module, step: int, freeze_last_layer_steps: int) -> None:
    """Drop the gradients of every parameter whose name contains `last_layer` while
    `step < freeze_last_layer_steps` (original: 1 epoch, i.e. `steps_per_epoch` steps).

    The gradients are set to None rather than zeroed, as in the original: AdamW then skips those
    parameters entirely, so neither weight decay nor stale moments move the prototypes either.
    """
    if step >= freeze_last_layer_steps:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """EMA update of the teacher's parameters from the (unwrapped) student's.

    Only parameters move, as in the original; buffers such as BatchNorm running statistics are
    the teacher's own (its forward passes update them). Pass the student without its DDP /
    accelerate wrapper, so that both modules have the same parameter names.
    """
    student_params = dict(student.named_parameters())
    teacher_items = list(teacher.named_parameters())
    if len(student_params) != len(teacher_items) or any(n not in student_params for n, _ in teacher_items):
        missing = sorted({n for n, _ in teacher_items} ^ set(student_params))[:5]
        raise ValueError(
            f"student and teacher parameters differ (unwrap the student from DDP/accelerate first); e.g. {missing}"
        )
    # Frozen student parameters (the region head of a view-only run) never change: skip them.
    moving = [(p, student_params[n]) for n, p in teacher_items if student_params[n].requires_grad]
    teacher_tensors = [t for t, _ in moving]
    student_tensors = [s.detach() for _, s in moving]
    torch._foreach_mul_(teacher_tensors, momentum)
    torch._foreach_add_(teacher_tensors, student_tensors, alpha=1.0 - momentum)


__all__ = ["build_optimizer", "cancel_last_layer_gradients", "clip_gradients", "get_param_groups", "update_teacher"]
