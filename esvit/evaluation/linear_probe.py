"""Linear probing of frozen features (Li et al., ICLR 2022, sec. 5; protocol of DINO, Caron et al. 2021).

A single linear layer (no batch norm; weights N(0, 0.01), bias 0) is trained with cross-entropy on
top of the frozen backbone, with SGD (momentum 0.9, no weight decay), a learning rate given for a
batch of 256 and scaled linearly with the global batch, and a cosine decay to 0 over the epochs
(one value per epoch). The feature is the concatenation of the token-averaged outputs of the last
4 blocks (`esvit.evaluation.features`).

Two ways to run it:

* **Full protocol** (`train_linear_probe`), as in the paper: every step sees a fresh
  RandomResizedCrop + flip of the training image through the frozen backbone; evaluation uses the
  resize-256 / centre-crop-224 view. Many processes through Accelerate.
* **Fast protocol** (`fast_linear_probe`): features of the centre-crop view are computed once and
  the classifier is trained on the cached features. Because it is cheap, the learning rate is
  chosen by a sweep on a held-out part of the *training* features (the test split is never used for
  selection), then the classifier is retrained on all training features and scored on the test
  features. Without augmentation it usually scores a little below the full protocol.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .features import compute_features

__all__ = [
    "FastLinearResult",
    "LinearClassifier",
    "cosine_epoch_schedule",
    "evaluate_on_features",
    "fast_linear_probe",
    "scaled_lr",
    "stratified_holdout",
    "topk_accuracy",
    "train_linear_probe",
    "train_on_features",
]

REFERENCE_BATCH_SIZE = 256


class LinearClassifier(nn.Module):
    """One linear layer on flattened frozen features: `[B, D] -> [B, num_labels]`."""

    def __init__(self, dim: int, num_labels: int, generator: torch.Generator | None = None):
        super().__init__()
        if dim < 1 or num_labels < 1:
            raise ValueError(f"dim and num_labels must be positive, got {dim} and {num_labels}.")
        self.linear = nn.Linear(dim, num_labels)
        # Small weights and zero bias: the probe starts close to a uniform prediction.
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01, generator=generator)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features.flatten(1))  # [B, num_labels]


def scaled_lr(lr: float, global_batch_size: int) -> float:
    """Linear scaling rule: `lr` is stated for a batch of 256 images."""
    return lr * global_batch_size / REFERENCE_BATCH_SIZE


def cosine_epoch_schedule(base_lr: float, epochs: int) -> list[float]:
    """Learning rate of each epoch, cosine from `base_lr` towards 0 (PyTorch's CosineAnnealingLR)."""
    if epochs < 1:
        raise ValueError(f"epochs must be positive, got {epochs}.")
    return [0.5 * base_lr * (1.0 + math.cos(math.pi * epoch / epochs)) for epoch in range(epochs)]


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, topk: Sequence[int] = (1, 5)) -> list[float]:
    """Percent of rows whose target is among the `k` highest logits, for every `k` in `topk`."""
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(
            f"expected logits [B, C] and targets [B]; got {tuple(logits.shape)} and {tuple(targets.shape)}."
        )
    if logits.shape[0] == 0:
        raise ValueError("cannot compute accuracy on an empty batch.")
    if max(topk) > logits.shape[1]:
        raise ValueError(f"top-{max(topk)} accuracy needs at least {max(topk)} classes, got {logits.shape[1]}.")
    ranked = logits.topk(max(topk), dim=1).indices  # [B, k_max]
    hits = ranked == targets[:, None]  # [B, k_max]
    return [100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in topk]


def _report_topk(num_classes: int) -> tuple[int, ...]:
    return (1, 5) if num_classes >= 5 else (1,)


# ----------------------------------------------------------------------- fast protocol (cached)
def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split row indices into (fit, held-out), holding out `fraction` of every class.

    A class with a single example stays entirely in the fit part.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must lie in (0, 1), got {fraction}.")
    generator = torch.Generator().manual_seed(seed)
    fit, held = [], []
    labels = labels.cpu()
    for cls in labels.unique(sorted=True):
        rows = (labels == cls).nonzero().flatten()
        rows = rows[torch.randperm(rows.numel(), generator=generator)]
        n_held = min(max(1, round(fraction * rows.numel())), rows.numel() - 1) if rows.numel() > 1 else 0
        held.append(rows[:n_held])
        fit.append(rows[n_held:])
    fit_idx, held_idx = torch.cat(fit).sort().values, torch.cat(held).sort().values
    if held_idx.numel() == 0:
        raise ValueError("no class has two examples: nothing can be held out for the learning-rate sweep.")
    return fit_idx, held_idx


def train_on_features(
    features: torch.Tensor,  # [N, D]
    labels: torch.Tensor,  # [N]
    num_classes: int,
    lr: float,
    epochs: int,
    batch_size: int = 256,
    seed: int = 0,
) -> LinearClassifier:
    """Train a `LinearClassifier` on cached features (one process; `lr` is per 256 images)."""
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows but {labels.shape[0]} labels.")
    device = features.device
    generator = torch.Generator().manual_seed(seed)
    classifier = LinearClassifier(features.shape[1], num_classes, generator=generator).to(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.0, momentum=0.9, weight_decay=0.0)
    lr_schedule = cosine_epoch_schedule(scaled_lr(lr, batch_size), epochs)
    labels = labels.to(device)
    classifier.train()
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_schedule[epoch]
        order = torch.randperm(features.shape[0], generator=generator).to(device)
        for start in range(0, features.shape[0], batch_size):
            rows = order[start : start + batch_size]
            loss = F.cross_entropy(classifier(features[rows].float()), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return classifier.eval()


@torch.no_grad()
def evaluate_on_features(
    classifier: nn.Module, features: torch.Tensor, labels: torch.Tensor, batch_size: int = 4096
) -> dict[str, float]:
    """Top-1 (and top-5 when there are at least 5 classes) accuracy of a classifier, in percent."""
    classifier.eval()
    chunks = range(0, features.shape[0], batch_size)
    logits = torch.cat([classifier(features[s : s + batch_size].float()) for s in chunks])  # [N, C]
    topk = _report_topk(logits.shape[1])
    return {f"top{k}": acc for k, acc in zip(topk, topk_accuracy(logits, labels.to(logits.device), topk))}


@dataclass
class FastLinearResult:
    best_lr: float
    sweep: dict[float, float]  # lr -> held-out top-1 (percent)
    test: dict[str, float]  # "top1"/"top5" -> percent
    classifier: LinearClassifier = field(repr=False)


def fast_linear_probe(
    train_features: torch.Tensor,  # [N, D]
    train_labels: torch.Tensor,  # [N]
    test_features: torch.Tensor,  # [M, D]
    test_labels: torch.Tensor,  # [M]
    num_classes: int,
    lrs: Sequence[float] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    epochs: int = 100,
    batch_size: int = 256,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    show_progress: bool = False,
) -> FastLinearResult:
    """Learning-rate sweep on held-out training features, then retrain on all of them and test.

    Ties in held-out accuracy go to the smaller learning rate.
    """
    if not lrs:
        raise ValueError("give at least one learning rate.")
    sweep: dict[float, float] = {}
    if len(lrs) > 1:
        fit_idx, held_idx = stratified_holdout(train_labels, holdout_fraction, seed)
        fit_idx, held_idx = fit_idx.to(train_features.device), held_idx.to(train_features.device)
        for lr in tqdm(sorted(lrs), desc="lr sweep", disable=not show_progress):
            classifier = train_on_features(
                train_features[fit_idx], train_labels[fit_idx.cpu()], num_classes, lr, epochs, batch_size, seed
            )
            sweep[lr] = evaluate_on_features(classifier, train_features[held_idx], train_labels[held_idx.cpu()])["top1"]
        best_lr = max(sorted(sweep), key=lambda lr: sweep[lr])  # max keeps the first (smallest) of ties
    else:
        best_lr = lrs[0]
    classifier = train_on_features(train_features, train_labels, num_classes, best_lr, epochs, batch_size, seed)
    test = evaluate_on_features(classifier, test_features, test_labels)
    return FastLinearResult(best_lr=best_lr, sweep=sweep, test=test, classifier=classifier)


# ------------------------------------------------------------------------ full protocol (paper)
def _feature_dim(model: nn.Module, image_size: int, kind: str, n: int, device: torch.device) -> int:
    dtype = next(model.parameters()).dtype
    probe = torch.zeros(1, 3, image_size, image_size, device=device, dtype=dtype)
    with torch.no_grad():
        return compute_features(model, probe, kind, n).shape[-1]


@torch.no_grad()
def _evaluate_loader(model, classifier, dataloader, accelerator, kind: str, n: int) -> dict[str, float]:
    classifier.eval()
    dtype = next(model.parameters()).dtype
    logits_all, labels_all = [], []
    for batch in tqdm(dataloader, desc="eval", disable=not accelerator.is_local_main_process, leave=False):
        with accelerator.autocast():
            feats = compute_features(model, batch["pixel_values"].to(dtype=dtype), kind, n).float()  # [B, D]
        logits = classifier(feats)  # [B, C]
        outputs = {"logits": logits, "labels": batch["labels"]}
        if "valid" in batch:  # placeholders of undecodable images are not scored
            outputs["valid"] = batch["valid"].long()
        gathered = accelerator.gather_for_metrics(outputs)
        keep = gathered["valid"].bool().cpu() if "valid" in gathered else slice(None)
        logits_all.append(gathered["logits"].float().cpu()[keep])
        labels_all.append(gathered["labels"].cpu()[keep])
    logits, labels = torch.cat(logits_all), torch.cat(labels_all)
    topk = _report_topk(logits.shape[1])
    result = {f"top{k}": acc for k, acc in zip(topk, topk_accuracy(logits, labels, topk))}
    result["loss"] = F.cross_entropy(logits, labels).item()
    return result


def _masked_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | int]:
    """Mean cross-entropy over the valid rows, and their number.

    Placeholders of undecodable images get zero weight; a batch without a valid row gives a zero loss
    whose backward still runs, so no process skips the gradient all-reduce of the others.
    """
    if valid is None or bool(valid.all()):
        return F.cross_entropy(logits, labels), labels.shape[0]
    weights = valid.to(logits.dtype)  # [B]
    count = weights.sum()
    return (F.cross_entropy(logits, labels, reduction="none") * weights).sum() / count.clamp(min=1), count


def train_linear_probe(
    model: nn.Module,
    train_loader,
    eval_loader,
    accelerator,
    num_classes: int,
    image_size: int,
    kind: str = "n_last_blocks",
    n: int = 4,
    lr: float = 1e-3,
    epochs: int = 100,
    val_freq: int = 1,
    seed: int = 0,
) -> dict:
    """The paper's linear probe: augmented images through the frozen backbone, SGD on the probe.

    `train_loader` / `eval_loader` must be plain DataLoaders (not yet prepared) yielding
    `collate_labelled` batches; `lr` is per 256 images and scaled by the global batch.

    Returns a dict with the final test "top1"/"top5", "best_top1" over the evaluated epochs (the
    original code reports this maximum, which selects on the test split), the scaled lr, and the
    per-epoch history.
    """
    model.requires_grad_(False).eval().to(accelerator.device)
    dim = _feature_dim(model, image_size, kind, n, accelerator.device)
    generator = torch.Generator().manual_seed(seed)
    classifier = LinearClassifier(dim, num_classes, generator=generator)
    global_batch = train_loader.batch_size * accelerator.num_processes
    lr_schedule = cosine_epoch_schedule(scaled_lr(lr, global_batch), epochs)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr_schedule[0], momentum=0.9, weight_decay=0.0)
    classifier, optimizer, train_loader, eval_loader = accelerator.prepare(
        classifier, optimizer, train_loader, eval_loader
    )
    dtype = next(model.parameters()).dtype

    history, best_top1, test = [], 0.0, {}
    for epoch in range(epochs):
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr_schedule[epoch]
        classifier.train()
        loss_sum = torch.zeros((), device=accelerator.device)
        seen = torch.zeros((), device=accelerator.device)
        for batch in tqdm(
            train_loader, desc=f"linear epoch {epoch}", disable=not accelerator.is_local_main_process, leave=False
        ):
            with torch.no_grad(), accelerator.autocast():
                feats = compute_features(model, batch["pixel_values"].to(dtype=dtype), kind, n).float()  # [B, D]
            loss, count = _masked_cross_entropy(classifier(feats), batch["labels"], batch.get("valid"))
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            loss_sum += loss.detach() * count
            seen += count
        totals = accelerator.reduce(torch.stack([loss_sum, seen]), reduction="sum")
        record = {"epoch": epoch, "lr": lr_schedule[epoch], "train_loss": (totals[0] / totals[1]).item()}
        if epoch % val_freq == 0 or epoch == epochs - 1:
            test = _evaluate_loader(model, classifier, eval_loader, accelerator, kind, n)
            best_top1 = max(best_top1, test["top1"])
            record.update({f"test_{k}": v for k, v in test.items()})
            accelerator.print(f"epoch {epoch}: train loss {record['train_loss']:.4f}, test top-1 {test['top1']:.2f}%")
        history.append(record)
    return {
        **{k: v for k, v in test.items() if k.startswith("top")},
        "best_top1": best_top1,
        "scaled_lr": lr_schedule[0],
        "global_batch_size": global_batch,
        "history": history,
        "classifier": accelerator.unwrap_model(classifier),
    }
