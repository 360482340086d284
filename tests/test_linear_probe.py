"""Linear-probe pieces (esvit.evaluation.linear_probe) and feature extraction order (esvit.evaluation.features)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from esvit.evaluation.features import extract_features
from esvit.evaluation.linear_probe import (
    LinearClassifier,
    cosine_epoch_schedule,
    evaluate_on_features,
    fast_linear_probe,
    scaled_lr,
    stratified_holdout,
    topk_accuracy,
    train_on_features,
)


def test_linear_classifier_is_one_linear_layer_with_paper_init():
    probe = LinearClassifier(1000, 200, generator=torch.Generator().manual_seed(0))
    assert [type(m) for m in probe.modules()] == [LinearClassifier, nn.Linear]  # no batch norm
    weight = probe.linear.weight
    assert weight.shape == (200, 1000)
    assert abs(weight.mean().item()) < 1e-4
    assert weight.std().item() == pytest.approx(0.01, rel=0.01)
    assert torch.count_nonzero(probe.linear.bias) == 0
    # Features of any trailing shape are flattened.
    assert probe(torch.randn(3, 10, 100)).shape == (3, 200)


def test_lr_scaling_and_cosine_schedule():
    assert scaled_lr(1e-3, 256) == pytest.approx(1e-3)
    assert scaled_lr(1e-3, 1024) == pytest.approx(4e-3)
    schedule = cosine_epoch_schedule(0.4, 4)
    expected = [0.4, 0.2 * (1 + math.cos(math.pi / 4)), 0.2, 0.2 * (1 + math.cos(3 * math.pi / 4))]
    assert schedule == pytest.approx(expected)
    # Same values as PyTorch's per-epoch CosineAnnealingLR (eta_min=0), which the original steps once per epoch.
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 4, eta_min=0)
    torch_lrs = []
    for _ in range(4):
        torch_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert schedule == pytest.approx(torch_lrs)


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    targets = torch.tensor([1, 2, 0, 2])
    # top-1 hits: row 0. top-2 adds row 1 (class 2 is second); rows 2 and 3 need all 3 classes.
    top1, top2, top3 = topk_accuracy(logits, targets, topk=(1, 2, 3))
    assert top1 == 25.0 and top2 == 50.0 and top3 == 100.0
    with pytest.raises(ValueError, match="at least 5 classes"):
        topk_accuracy(logits, targets, topk=(1, 5))


def test_stratified_holdout_keeps_every_class_in_both_parts():
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 1 + [3] * 2)
    fit, held = stratified_holdout(labels, 0.2, seed=3)
    assert torch.equal(torch.cat([fit, held]).sort().values, torch.arange(len(labels)))
    held_counts = torch.bincount(labels[held], minlength=4).tolist()
    assert held_counts == [2, 4, 0, 1]  # a single example stays in the fit part
    assert set(labels[fit].tolist()) == {0, 1, 2, 3}
    again, _ = stratified_holdout(labels, 0.2, seed=3)
    assert torch.equal(fit, again)


def _blobs(n_per_class: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[4.0, 0, 0, 0, 1, 0], [0, 4.0, 0, 0, 1, 0], [0, 0, 4.0, 0, 1, 0], [-4.0, -4.0, 0, 0, 1, 0]])
    labels = torch.arange(4).repeat_interleave(n_per_class)
    feats = centres[labels] + 0.7 * torch.randn(len(labels), 6, generator=g)
    return feats, labels


def test_training_on_features_separates_blobs():
    feats, labels = _blobs(30, seed=0)
    probe = train_on_features(feats, labels, num_classes=4, lr=1.0, epochs=10, batch_size=16)
    assert evaluate_on_features(probe, feats, labels) == {"top1": 100.0}


def test_sweep_picks_the_best_lr_on_held_out_train_features():
    train_x, train_y = _blobs(40, seed=0)
    test_x, test_y = _blobs(25, seed=1)
    result = fast_linear_probe(
        train_x,
        train_y,
        test_x,
        test_y,
        num_classes=4,
        lrs=(1e-7, 3.0, 1e-6),
        epochs=5,
        batch_size=16,
        holdout_fraction=0.25,
    )
    # The tiny rates leave the probe at its near-random init; 3.0 separates the blobs.
    assert set(result.sweep) == {1e-7, 1e-6, 3.0}
    assert result.sweep[3.0] == 100.0 and max(result.sweep[1e-7], result.sweep[1e-6]) < 60.0
    assert result.best_lr == 3.0
    assert result.test["top1"] > 95.0 and "top5" not in result.test  # 4 classes: no top-5
    # The reported test score is that of the classifier retrained on all train features.
    assert evaluate_on_features(result.classifier, test_x, test_y) == result.test
    # Ties go to the smaller rate.
    tie = fast_linear_probe(
        train_x, train_y, test_x, test_y, num_classes=4, lrs=(3.0, 1.0), epochs=5, batch_size=16, holdout_fraction=0.25
    )
    assert tie.sweep[1.0] == tie.sweep[3.0] == 100.0 and tie.best_lr == 1.0


# ------------------------------------------------------------------------------ feature extraction
class _RowModel(nn.Module):
    """Pooled feature = the first 3 pixels, n-last-blocks feature = their 2n multiples."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, pixel_values):
        return SimpleNamespace(pooler_output=pixel_values.flatten(1)[:, :3])

    def get_n_last_blocks_features(self, pixel_values, n):
        return pixel_values.flatten(1)[:, :1] * self.scale * torch.arange(1, n + 1)


class _IndexedImages(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"pixel_values": torch.full((3, 4, 4), float(i)), "labels": i % 3, "index": i}


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    yield Accelerator(cpu=True)
    # The accelerator state is process-wide: leave none behind for other tests.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_extract_features_keeps_dataset_order(accelerator):
    # (The 2-process gather is exercised by tests/test_probe_e2e.py.)
    loader = accelerator.prepare(torch.utils.data.DataLoader(_IndexedImages(11), batch_size=4))
    feats, labels = extract_features(_RowModel(), loader, accelerator, ("pooled", "n_last_blocks"), n=2)
    rows = torch.arange(11, dtype=torch.float32)
    torch.testing.assert_close(feats["pooled"], rows[:, None].expand(11, 3))
    torch.testing.assert_close(feats["n_last_blocks"], torch.stack([2 * rows, 4 * rows], dim=1))
    assert torch.equal(labels, torch.arange(11) % 3)
    single, _ = extract_features(_RowModel(), loader, accelerator, "pooled")
    torch.testing.assert_close(single, feats["pooled"])
    with pytest.raises(ValueError, match="unknown feature kind"):
        extract_features(_RowModel(), loader, accelerator, "cls")
