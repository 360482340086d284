"""Teacher targets: how the teacher's head outputs become the soft labels the student predicts.

Each function maps teacher logits `[N, K]` to probabilities `[N, K]` (rows sum to 1) and the summed
row entropies (a collapse diagnostic), in float32, without gradients. `EsViTLoss` picks one by
name (`teacher_normalization`); adding a normalisation is adding a function to `TEACHER_TARGETS`.

* `"centering"` (DINO, Caron et al. 2021, §3.1; EsViT's default and the original code's):
  `softmax((t - c) / tau_t)` with `c` an EMA of the batch means (see `centering`). Centring stops
  one prototype from dominating, sharpening (small `tau_t`) stops the uniform solution.
* `"sinkhorn_knopp"` (SwAV, Caron et al. 2020, §3.1; used for the teacher by DINOv2, Oquab et
  al. 2023, §4): the rows of `exp(t / tau_t)` are rescaled a few times so that every prototype
  receives the same total mass over the batch (all processes) and every row sums to 1. The batch
  itself then cannot collapse onto a constant or a uniform assignment; no centre is needed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

#: Sinkhorn-Knopp iterations of DINOv2's teacher.
SINKHORN_ITERATIONS = 3


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs: half-precision logits are upcast for the softmaxes."""
    return torch.promote_types(tensor.dtype, torch.float32)


@torch.no_grad()
def softmax_center_teacher(
    logits: torch.Tensor, center: torch.Tensor, temp: float, chunk_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`softmax((logits - center) / temp)` row-wise, in chunks of `chunk_rows` rows.

    `logits` is `[N, K]`, `center` `[1, K]`; returns probabilities `[N, K]` and the entropy sum.
    """
    dtype = compute_dtype(logits)
    probs = torch.empty(logits.shape, dtype=dtype, device=logits.device)
    entropy = torch.zeros((), dtype=dtype, device=logits.device)
    for start in range(0, logits.shape[0], chunk_rows):
        stop = min(start + chunk_rows, logits.shape[0])
        scaled = (logits[start:stop].to(dtype) - center) / temp  # [c, K]
        chunk_probs = F.softmax(scaled, dim=-1)
        probs[start:stop] = chunk_probs
        entropy -= torch.sum(chunk_probs * F.log_softmax(scaled, dim=-1))
    return probs, entropy


def _all_reduce_(tensor: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def sinkhorn_knopp_teacher(
    logits: torch.Tensor,
    center: torch.Tensor | None,
    temp: float,
    chunk_rows: int,
    iterations: int = SINKHORN_ITERATIONS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Equipartitioned soft assignments of the `N` rows (all processes together) to `K` prototypes.

    `center` is ignored (the normalisation replaces it). Every process must call this with the
    same `iterations`: the column sums are all-reduced. Returns `[N, K]` probabilities and the
    entropy sum.
    """
    del center, chunk_rows
    dtype = compute_dtype(logits)
    scaled = logits.to(dtype) / temp  # [N, K]
    # exp overflows for logits / temp > 88: subtract the global maximum, which scales Q uniformly
    # and so leaves every normalised value unchanged.
    peak = _all_reduce_(scaled.max().reshape(1).clone(), op=dist.ReduceOp.MAX if dist.is_available() else None)
    q = torch.exp(scaled - peak)  # [N, K]
    rows = torch.tensor(float(q.shape[0]), dtype=dtype, device=q.device)
    total_rows = _all_reduce_(rows.clone())
    num_prototypes = q.shape[1]
    q /= _all_reduce_(q.sum().reshape(1))
    for _ in range(iterations):
        q /= _all_reduce_(q.sum(dim=0, keepdim=True))  # every prototype: the same mass ...
        q /= num_prototypes
        q /= q.sum(dim=1, keepdim=True)  # ... and every row a distribution
        q /= total_rows
    q *= total_rows
    entropy = -torch.sum(q * torch.log(q.clamp_min(torch.finfo(dtype).tiny)))
    return q, entropy


#: Name -> function `(logits [N, K], center [1, K] | None, temp, chunk_rows) -> (probs, entropy sum)`.
TEACHER_TARGETS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "centering": softmax_center_teacher,
    "sinkhorn_knopp": sinkhorn_knopp_teacher,
}

__all__ = [
    "SINKHORN_ITERATIONS",
    "TEACHER_TARGETS",
    "compute_dtype",
    "sinkhorn_knopp_teacher",
    "softmax_center_teacher",
]
