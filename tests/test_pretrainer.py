"""`EsViTPretrainer`: one training step as an object, against the composition it replaced.

The reference below is the loop body `run_pretraining.py` had inline before the step became an
object (teacher forward, student forward, loss with the centre update inside, backward, schedules,
clipping, last-layer freeze, optimizer step, then the EMA teacher).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from esvit import EsViTConfig, EsViTForPreTraining
from esvit.training.loss import EsViTLoss
from esvit.training.optim import cancel_last_layer_gradients, clip_gradients, get_param_groups, update_teacher
from esvit.training.pretrainer import EsViTPretrainer, NonFiniteLossError
from esvit.training.schedules import plan_training

STEPS = 3


def _config() -> EsViTConfig:
    return EsViTConfig.from_preset("swin-micro", image_size=64, window_size=4, drop_path_rate=0.0, head_out_dim=64)


def _crops(step: int, batch: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(batch, 3, 64, 64, generator=generator) for _ in range(2)] + [
        torch.randn(batch, 3, 32, 32, generator=generator) for _ in range(2)
    ]


def _plan():
    args = SimpleNamespace(
        warmup_epochs=0, warmup_steps=0, warmup_teacher_temp_epochs=0, warmup_teacher_temp_steps=2,
        freeze_last_layer_epochs=0, freeze_last_layer_steps=1, max_train_steps=STEPS, num_train_epochs=1,
        learning_rate=0.05, min_lr=1e-4, weight_decay=0.04, weight_decay_end=0.1, momentum_teacher=0.9,
        warmup_teacher_temp=0.04, teacher_temp=0.06,
    )  # fmt: skip
    return plan_training(args, steps_per_epoch=None, global_batch_size=256)


def _networks(seed: int = 0):
    torch.manual_seed(seed)
    student = EsViTForPreTraining(_config())
    teacher = copy.deepcopy(student).requires_grad_(False)
    return student, teacher


def _pretrainer(student, teacher, **kwargs):
    accelerator = Accelerator(cpu=True)
    loss_fn = EsViTLoss(out_dim=64)
    optimizer = torch.optim.AdamW(get_param_groups(student))
    student, optimizer = accelerator.prepare(student, optimizer)
    return EsViTPretrainer(accelerator, student, teacher, loss_fn, optimizer, _plan(), clip_grad=0.3, **kwargs)


def _reference_steps(student, teacher, steps: int):
    """The inline composition `run_pretraining.py` had before `EsViTPretrainer`."""
    plan = _plan()
    loss_fn = EsViTLoss(out_dim=64)
    optimizer = torch.optim.AdamW(get_param_groups(student))
    for step in range(steps):
        crops = _crops(step)
        with torch.no_grad():
            teacher_out = teacher(crops[:2])
        out = loss_fn(student(crops), teacher_out, teacher_temp=float(plan.schedules.teacher_temp[step]))
        out.loss.backward()
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = float(plan.schedules.lr[step])
            if i == 0:
                group["weight_decay"] = float(plan.schedules.weight_decay[step])
        clip_gradients(student, 0.3)
        cancel_last_layer_gradients(student, step, plan.freeze_last_layer_steps)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_teacher(student, teacher, float(plan.schedules.teacher_momentum[step]))
    return loss_fn


def test_train_step_moves_the_student_and_update_teacher_moves_the_teacher():
    student, teacher = _networks()
    pretrainer = _pretrainer(student, teacher)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in pretrainer.unwrapped_student.state_dict().items()}
    center_before = pretrainer.loss_fn.view_center.clone()

    out = pretrainer.train_step(_crops(0), step=0)
    assert out.optimizer_step and not out.skipped and torch.isfinite(out.loss)
    assert not out.loss.requires_grad and out.region_loss is not None
    after = pretrainer.unwrapped_student.state_dict()
    changed = [k for k in student_before if not torch.equal(student_before[k], after[k])]
    assert changed and all("last_layer" not in k for k in changed)  # the last layers are frozen at step 0
    for key, value in teacher.state_dict().items():  # the teacher waits for update_teacher
        torch.testing.assert_close(value, teacher_before[key], rtol=0, atol=0)
    torch.testing.assert_close(pretrainer.loss_fn.view_center, center_before, rtol=0, atol=0)

    pretrainer.update_teacher(0)
    moved = [k for k, v in teacher.state_dict().items() if not torch.equal(v, teacher_before[k])]
    assert set(changed) <= set(moved)  # the EMA carries every update of the student into the teacher
    assert not torch.equal(pretrainer.loss_fn.view_center, center_before)


def test_three_steps_equal_the_inline_composition():
    student, teacher = _networks()
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    pretrainer = _pretrainer(student, teacher)
    for step in range(STEPS):
        out = pretrainer.train_step(_crops(step), step)
        assert out.optimizer_step
        pretrainer.update_teacher(step)
    ref_loss = _reference_steps(ref_student, ref_teacher, STEPS)

    for name, value in pretrainer.unwrapped_student.state_dict().items():
        torch.testing.assert_close(value, ref_student.state_dict()[name], rtol=1e-6, atol=1e-6, msg=name)
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(value, ref_teacher.state_dict()[name], rtol=1e-6, atol=1e-6, msg=name)
    for name, value in pretrainer.loss_fn.state_dict().items():
        torch.testing.assert_close(value, ref_loss.state_dict()[name], rtol=1e-6, atol=1e-6, msg=name)


def test_a_nonfinite_step_is_skipped_whole_and_too_many_stop_the_run(monkeypatch):
    student, teacher = _networks()
    pretrainer = _pretrainer(student, teacher, max_consecutive_nonfinite=2)
    pretrainer.train_step(_crops(0), 0)
    pretrainer.update_teacher(0)
    student_before = {k: v.clone() for k, v in pretrainer.unwrapped_student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    center_before = pretrainer.loss_fn.view_center.clone()

    real_forward = EsViTForPreTraining.forward

    def poisoned(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        out.view_logits = out.view_logits * float("inf")
        return out

    monkeypatch.setattr(EsViTForPreTraining, "forward", poisoned)
    out = pretrainer.train_step(_crops(1), 1)
    assert out.optimizer_step and out.skipped
    pretrainer.update_teacher(1)
    for key, value in pretrainer.unwrapped_student.state_dict().items():
        torch.testing.assert_close(value, student_before[key], rtol=0, atol=0, msg=key)
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_before[key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(pretrainer.loss_fn.view_center, center_before, rtol=0, atol=0)
    assert pretrainer.nonfinite_steps == 1 and pretrainer.first_bad_step == 2  # the 2nd optimizer step
    with pytest.raises(NonFiniteLossError, match="first at step 2"):
        pretrainer.train_step(_crops(2), 2)


def test_fused_adamw_makes_the_same_updates_from_the_same_gradients():
    """Three scheduled steps of the fused and the default AdamW fed the same gradients agree to
    float rounding. (Trained side by side they drift apart by more: at these learning rates a
    rounding-level difference after step 1 changes the next gradients, which Adam normalises.)"""
    from esvit.training.optim import build_optimizer

    student, teacher = _networks()
    other = copy.deepcopy(student)
    plan, loss_fn = _plan(), EsViTLoss(out_dim=64)
    default = torch.optim.AdamW(get_param_groups(student))
    fused = build_optimizer(get_param_groups(other), "fused", torch.device("cpu"))
    assert fused.defaults["fused"]
    for step in range(STEPS):
        crops = _crops(step)
        with torch.no_grad():
            teacher_out = teacher(crops[:2])
        loss_fn(student(crops), teacher_out, teacher_temp=float(plan.schedules.teacher_temp[step])).loss.backward()
        clip_gradients(student, 0.3)
        cancel_last_layer_gradients(student, step, plan.freeze_last_layer_steps)
        for p, q in zip(student.parameters(), other.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
        for optimizer in (default, fused):
            for i, group in enumerate(optimizer.param_groups):
                group["lr"] = float(plan.schedules.lr[step])
                if i == 0:
                    group["weight_decay"] = float(plan.schedules.weight_decay[step])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for (name, p), q in zip(student.named_parameters(), other.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6, msg=f"step {step}: {name}")
    with pytest.raises(ValueError, match="unknown optimizer implementation"):
        build_optimizer(get_param_groups(student), "apex", torch.device("cpu"))
    assert not build_optimizer(get_param_groups(student), "auto", torch.device("cpu")).defaults["fused"]


def test_koleo_is_the_mean_negative_log_distance_to_the_nearest_other_feature():
    from esvit.training.koleo import koleo_loss, koleo_per_crop

    features = torch.randn(12, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.nn.functional.normalize(features, dim=-1)
    distances = torch.cdist(x, x) + torch.diag(torch.full((12,), float("inf"), dtype=torch.float64))
    expected = -torch.log(distances.min(dim=1).values + 1e-8).mean()
    torch.testing.assert_close(koleo_loss(features).double(), expected, rtol=1e-5, atol=1e-6)
    # two nearly equal features cost more than well spread ones, and the gradient pushes them apart
    spread = torch.eye(4)
    close = spread.clone()
    close[1] = close[0] + 1e-3 * torch.tensor([0.0, 1.0, 0.0, 0.0])
    close.requires_grad_(True)
    assert koleo_loss(close) > koleo_loss(spread) + 1.0
    koleo_loss(close).backward()
    stepped = close.detach() - 1e-4 * close.grad
    assert (stepped[0] - stepped[1]).norm() > (close[0] - close[1]).detach().norm()
    pooled = torch.randn(2 * 6, 5)
    torch.testing.assert_close(koleo_per_crop(pooled, 2), koleo_loss(pooled[:6]) + koleo_loss(pooled[6:]))
    single = torch.randn(1, 5, requires_grad=True)  # no neighbour: no term, but a graph to backward through
    assert koleo_loss(single).item() == 0.0
    koleo_loss(single).backward()
    assert torch.equal(single.grad, torch.zeros(1, 5))


def test_a_koleo_weight_adds_the_weighted_term_to_the_loss_and_trains_through_it():
    from esvit.training.koleo import koleo_per_crop

    student, teacher = _networks()
    plain = _pretrainer(copy.deepcopy(student), copy.deepcopy(teacher))
    weighted = _pretrainer(student, teacher, koleo_weight=0.1)
    crops = _crops(0)
    out_plain, out = plain.train_step(crops, 0), weighted.train_step(crops, 0)
    assert out_plain.koleo_loss is None and out.koleo_loss is not None
    with torch.no_grad():
        _, fresh = _networks()  # the student before its step: the same weights as the teacher
        expected = koleo_per_crop(fresh(crops).pooler_output[: 2 * crops[0].shape[0]], 2)
    torch.testing.assert_close(out.koleo_loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, out_plain.loss + 0.1 * out.koleo_loss, rtol=1e-5, atol=1e-6)
    moved = [
        k
        for k, v in weighted.unwrapped_student.state_dict().items()
        if not torch.equal(v, plain.unwrapped_student.state_dict()[k])
    ]
    assert any(k.startswith("esvit.") for k in moved)  # the backbone gets the KoLeo gradient
