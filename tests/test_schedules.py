"""Schedules and optimizer helpers: parity with the original's `cosine_scheduler`,
`get_params_groups`, `clip_gradients`, `cancel_gradients_last_layer` and the teacher EMA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from esvit.heads import DINOHead
from esvit.training.optim import cancel_last_layer_gradients, clip_gradients, get_param_groups, update_teacher
from esvit.training.schedules import build_schedules, cosine_schedule, teacher_temp_schedule
from tests.reference import reference_config


@pytest.fixture(scope="module")
def schedules_json(reference_dir):
    return json.loads((reference_dir / "schedules.json").read_text())


def test_cosine_schedule_reproduces_original_bit_for_bit(schedules_json):
    base, final, epochs, steps, warmup = schedules_json["lr"]["args"]
    lr = cosine_schedule(base, final, epochs * steps, warmup_steps=warmup * steps)
    np.testing.assert_array_equal(lr, np.array(schedules_json["lr"]["values"]))
    for name in ("wd", "momentum"):
        base, final, epochs, steps = schedules_json[name]["args"]
        values = cosine_schedule(base, final, epochs * steps)
        np.testing.assert_array_equal(values, np.array(schedules_json[name]["values"]))


def test_teacher_temperature_reproduces_released_recipe(schedules_json):
    temps = teacher_temp_schedule(0.04, 0.07, warmup_length=30, total_length=300)
    assert temps.shape == (300,)
    np.testing.assert_array_equal(temps[:31], np.array(schedules_json["teacher_temp_released"]["first_31"]))
    assert (temps[29:] == 0.07).all()


def test_build_schedules_reproduces_original_setup(schedules_json):
    # The fixture's lr args were already scaled: 0.000125 = lr 5e-4 * batch 64 / 256.
    lr_base, min_lr, epochs, steps, warmup = schedules_json["lr"]["args"]
    schedules = build_schedules(
        epochs=epochs,
        steps_per_epoch=steps,
        global_batch_size=64,
        base_lr=lr_base * 256 / 64,
        min_lr=min_lr,
        warmup_epochs=warmup,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum_teacher=0.996,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=3,
    )
    assert len(schedules) == epochs * steps
    np.testing.assert_array_equal(schedules.lr, np.array(schedules_json["lr"]["values"]))
    np.testing.assert_array_equal(schedules.weight_decay, np.array(schedules_json["wd"]["values"]))
    np.testing.assert_array_equal(schedules.teacher_momentum, np.array(schedules_json["momentum"]["values"]))
    # Teacher temperature: per epoch (0.04, 0.055, 0.07, 0.07), constant within an epoch.
    expected_temp = np.repeat(np.linspace(0.04, 0.07, 3).tolist() + [0.07], steps)
    np.testing.assert_array_equal(schedules.teacher_temp, expected_temp)


def test_lr_scales_linearly_with_global_batch():
    small = build_schedules(epochs=2, steps_per_epoch=3, global_batch_size=256, base_lr=1e-3, warmup_epochs=0)
    large = build_schedules(epochs=2, steps_per_epoch=3, global_batch_size=1024, base_lr=1e-3, warmup_epochs=0)
    assert small.lr[0] == pytest.approx(1e-3) and large.lr[0] == pytest.approx(4e-3)


def test_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match="exceeds"):
        cosine_schedule(1.0, 0.0, total_steps=3, warmup_steps=4)
    with pytest.raises(ValueError, match="warmup_length"):
        teacher_temp_schedule(0.04, 0.07, warmup_length=5, total_length=3)
    with pytest.raises(ValueError, match=">= 1"):
        build_schedules(epochs=0, steps_per_epoch=3, global_batch_size=8)


# ---------------------------------------------------------------------- parameter groups


def test_param_groups_match_original_split(reference_manifest):
    from esvit.modeling_esvit import EsViTForPreTraining

    # drop_path_rate at the config default (0.1), as this test always had it: it adds no parameter
    config = reference_config(reference_manifest, "swin_tiny_w7", drop_path_rate=0.1)
    model = EsViTForPreTraining(config)
    names = {id(p): n.removeprefix("esvit.encoder.") for n, p in model.named_parameters()}
    groups = get_param_groups(model)
    assert groups[1]["weight_decay"] == 0.0 and "weight_decay" not in groups[0]
    got = [sorted(names[id(p)] for p in g["params"]) for g in groups]
    expected = reference_manifest["optimizer_param_groups"]["groups"]["swin_tiny_w7"]
    assert got[0] == sorted(expected["regularized(group0)"])
    assert got[1] == sorted(expected["not_regularized(group1, weight_decay=0)"])


def test_param_groups_skip_frozen_and_split_by_shape():
    head = DINOHead(4, 6, norm_last_layer=True, num_layers=2, hidden_dim=5, bottleneck_dim=3)
    regularized, not_regularized = (g["params"] for g in get_param_groups(head))
    assert {p.shape for p in regularized} == {torch.Size([5, 4]), torch.Size([3, 5]), torch.Size([6, 3])}
    assert all(p.ndim == 1 for p in not_regularized)
    assert all(p is not head.last_layer.weight_g for p in regularized + not_regularized)  # frozen


# ---------------------------------------------------------------------- clipping


def two_param_model(grad_a: torch.Tensor, grad_b: torch.Tensor) -> nn.Module:
    model = nn.Module()
    model.a = nn.Parameter(torch.zeros_like(grad_a))
    model.b = nn.Parameter(torch.zeros_like(grad_b))
    model.frozen = nn.Parameter(torch.zeros(2))  # no gradient: ignored
    model.a.grad, model.b.grad = grad_a.clone(), grad_b.clone()
    return model


def test_per_param_clipping_scales_each_gradient_on_its_own():
    grad_a = torch.tensor([6.0, 8.0])  # norm 10 -> clipped to ~3
    grad_b = torch.tensor([0.3, 0.4, 1.2])  # norm 1.3 -> untouched
    model = two_param_model(grad_a, grad_b)
    norms = clip_gradients(model, 3.0)
    torch.testing.assert_close(norms, torch.tensor([10.0, 1.3]))
    # The original: g *= clip / (||g|| + 1e-6) when that factor is below 1.
    torch.testing.assert_close(model.a.grad, grad_a * (3.0 / (torch.tensor(10.0) + 1e-6)), rtol=0, atol=0)
    assert torch.equal(model.b.grad, grad_b)


def test_global_clipping_is_clip_grad_norm():
    grad_a, grad_b = torch.tensor([6.0, 8.0]), torch.tensor([0.3, 0.4, 1.2])
    model = two_param_model(grad_a, grad_b)
    total = clip_gradients(model, 3.0, mode="global")
    torch.testing.assert_close(total, torch.cat([grad_a, grad_b]).norm())
    scale = 3.0 / (total + 1e-6)
    torch.testing.assert_close(model.a.grad, grad_a * scale)
    torch.testing.assert_close(model.b.grad, grad_b * scale)
    with pytest.raises(ValueError, match="per_param"):
        clip_gradients(model, 3.0, mode="layerwise")


# ---------------------------------------------------------------------- last layer


def test_last_layer_gradients_are_dropped_only_while_frozen():
    head = DINOHead(4, 6, norm_last_layer=False, num_layers=2, hidden_dim=5, bottleneck_dim=3)

    def backward():
        head.zero_grad(set_to_none=True)
        head(torch.randn(2, 4)).sum().backward()

    backward()
    cancel_last_layer_gradients(head, step=4, freeze_last_layer_steps=5)
    for name, param in head.named_parameters():
        assert (param.grad is None) == ("last_layer" in name), name
    backward()
    cancel_last_layer_gradients(head, step=5, freeze_last_layer_steps=5)
    assert all(p.grad is not None for p in head.parameters())


# ---------------------------------------------------------------------- teacher EMA


def test_teacher_ema_updates_parameters_only():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    teacher = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    teacher[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student[1].running_mean.fill_(-3.0)
    update_teacher(student, teacher, momentum=0.9)
    for name, param in teacher.named_parameters():
        expected = before[name] * 0.9 + (1 - 0.9) * dict(student.named_parameters())[name]
        torch.testing.assert_close(param, expected)
    assert torch.equal(teacher[1].running_mean, before["1.running_mean"])
    assert all(not p.requires_grad or p.grad is None for p in teacher.parameters())


def test_teacher_ema_rejects_mismatched_modules():
    with pytest.raises(ValueError, match="unwrap"):
        update_teacher(nn.Linear(3, 4), nn.Sequential(nn.Linear(3, 4)), momentum=0.9)
