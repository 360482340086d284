"""Weighted k-nearest-neighbour classification of frozen features.

This is the k-NN protocol of DINO (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021, sec. 4.1 and appendix), which EsViT reports next to the linear probe
(Li et al., ICLR 2022, Table 1): features are L2-normalised, every test image looks up its `k`
training neighbours by cosine similarity, and neighbour `j` votes for its label with weight
`exp(s_j / T)`. The class with the largest summed vote is the prediction; the classes ranked by
vote give top-5 (a class that received no vote is never a top-5 hit, so the score does not depend
on how ties at zero are ordered). With T = 0.07 close neighbours dominate the vote, so k = 20 is usually best.

The test set is processed in chunks of rows so that the `[chunk, N]` similarity matrix, not an
`[M, N]` one, bounds memory. All requested `k` share one similarity matrix and one `topk` call
with the largest `k`: the first `k` of a sorted top-`k_max` list are the top-`k` neighbours.

Example:
    >>> results = knn_classify(train_feats, train_labels, test_feats, test_labels, num_classes=10)
    >>> results[20]["top1"]  # percent
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["knn_classify", "knn_vote"]


def _check_inputs(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, num_classes: int
) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(
            f"features must be 2-D [num_images, dim]; got train {tuple(train_features.shape)} and "
            f"test {tuple(test_features.shape)}."
        )
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train features have dim {train_features.shape[1]} but test features have dim {test_features.shape[1]}."
        )
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"train_labels must have shape [{train_features.shape[0]}], got {tuple(train_labels.shape)}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}.")
    if train_labels.numel() and (int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes):
        raise ValueError(
            f"train labels must lie in [0, {num_classes}); got range "
            f"[{int(train_labels.min())}, {int(train_labels.max())}]."
        )


def knn_vote(
    similarities: torch.Tensor,  # [B, k] cosine similarities of the k nearest neighbours
    neighbour_labels: torch.Tensor,  # [B, k] their labels
    num_classes: int,
    temperature: float,
) -> torch.Tensor:  # [B, num_classes] summed exp(s / T) votes per class
    """Sum the temperature-weighted votes of the neighbours per class."""
    weights = (similarities / temperature).exp()  # [B, k]
    votes = similarities.new_zeros(similarities.shape[0], num_classes)  # [B, C]
    return votes.scatter_add_(1, neighbour_labels, weights)


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,  # [N, D]
    train_labels: torch.Tensor,  # [N] int
    test_features: torch.Tensor,  # [M, D]
    test_labels: torch.Tensor,  # [M] int
    num_classes: int,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    batch_size: int = 1024,
    leave_one_out: bool = False,
) -> dict[int, dict[str, float]]:
    """Weighted k-NN accuracy for every `k` in `ks`.

    Args:
        train_features, test_features: any scale; they are L2-normalised here (in float32).
        train_labels, test_labels: class indices in `[0, num_classes)`.
        num_classes: number of classes; top-5 is reported only when it is at least 5.
        ks: neighbourhood sizes, each at most the number of training images.
        temperature: T in the vote weight exp(similarity / T).
        batch_size: test rows per chunk (bounds the `[batch_size, N]` similarity matrix).
        leave_one_out: the test set is the training set, row for row, and each image votes among
            all the others (never itself): every labelled image is a query, for sets too small
            to split.

    Returns:
        `{k: {"top1": percent, "top5": percent}}` ("top5" only when `num_classes >= 5`).
    """
    _check_inputs(train_features, train_labels, test_features, num_classes)
    if test_labels.shape != (test_features.shape[0],):
        raise ValueError(f"test_labels must have shape [{test_features.shape[0]}], got {tuple(test_labels.shape)}.")
    if test_features.shape[0] == 0:
        raise ValueError("the test set is empty.")
    if leave_one_out and (test_features.shape != train_features.shape or not torch.equal(test_labels, train_labels)):
        raise ValueError("leave_one_out needs the same features and labels as the test and the training set.")
    ks = sorted({int(k) for k in ks})
    num_train = train_features.shape[0] - int(leave_one_out)
    if not ks or ks[0] < 1 or ks[-1] > num_train:
        raise ValueError(f"every k must lie in [1, {num_train}] (the number of training images); got {ks}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")

    device = train_features.device
    train = F.normalize(train_features.float(), dim=1)  # [N, D]
    train_labels = train_labels.to(device=device, dtype=torch.long)
    with_top5 = num_classes >= 5
    correct1 = dict.fromkeys(ks, 0)
    correct5 = dict.fromkeys(ks, 0)

    for start in range(0, test_features.shape[0], batch_size):
        queries = F.normalize(test_features[start : start + batch_size].to(device).float(), dim=1)  # [B, D]
        targets = test_labels[start : start + batch_size].to(device=device, dtype=torch.long)  # [B]
        similarity = queries @ train.T  # [B, N]
        if leave_one_out:  # no image is its own neighbour
            rows = torch.arange(similarity.shape[0], device=device)
            similarity[rows, start + rows] = -float("inf")
        top_sims, top_idx = similarity.topk(ks[-1], dim=1, largest=True, sorted=True)  # [B, k_max]
        top_labels = train_labels[top_idx]  # [B, k_max]
        for k in ks:
            votes = knn_vote(top_sims[:, :k], top_labels[:, :k], num_classes, temperature)  # [B, C]
            ranked = votes.topk(min(5, num_classes), dim=1).indices  # [B, min(5, C)]
            # A class no neighbour voted for has a zero score; its rank among the other zero-score
            # classes is arbitrary (the original's sort leaves it to the device), so it never counts
            # as a top-5 hit. Top-1 is unaffected: the best class always has a vote.
            voted = votes.gather(1, ranked) > 0  # [B, min(5, C)]
            hits = (ranked == targets[:, None]) & voted  # [B, min(5, C)]
            correct1[k] += int(hits[:, 0].sum())
            if with_top5:
                correct5[k] += int(hits.any(dim=1).sum())

    total = test_features.shape[0]
    results: dict[int, dict[str, float]] = {}
    for k in ks:
        results[k] = {"top1": 100.0 * correct1[k] / total}
        if with_top5:
            results[k]["top5"] = 100.0 * correct5[k] / total
    return results
