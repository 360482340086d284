"""The centres of DINO / EsViT: EMAs of the teacher's mean output, one per head.

DINO (Caron et al., ICCV 2021, §3.1, eq. 4) avoids collapse by centring and sharpening the teacher:
`c <- m * c + (1 - m) * mean_batch(g_t(x))`, with `m = 0.9`; EsViT (Li et al., ICLR 2022, §3.2)
keeps a second centre for the region head. This module holds the mechanism shared by both:

* `teacher_statistics`: a process's column sums of teacher outputs and their row counts, packed
  into one vector, so that all centres travel in a single all-reduce and a process with fewer rows
  (a smaller last batch, fewer regions) is weighted by its rows;
* `PendingCenterUpdate`: statistics added up over the micro-batches of one optimizer step and
  applied once, as one large batch would, or discarded when the step is skipped (non-finite loss);
* `apply_center_update`: the all-reduce (a no-op without a process group) and the EMA.

The centres themselves are buffers of `EsViTLoss` (so its `state_dict` is `{view_center,
region_center}`, the original's `center` / `center_grid`). They are not buffers of a model: the
teacher is never wrapped in DistributedDataParallel (it has no gradients), and the student's DDP
would broadcast rank 0's buffers at every forward, which is pointless because the all-reduce below
already gives every process the same centre.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


@torch.no_grad()
def teacher_statistics(groups: Sequence[Sequence[torch.Tensor]], out_dim: int) -> torch.Tensor:
    """Packed `[sum_1 (K), ..., sum_n (K), rows_1, ..., rows_n]` float32 statistics.

    Args:
        groups: one entry per centre; each a list of teacher outputs `[..., K]` whose rows all feed
            that centre (e.g. the view logits; the region logits of every global crop).
        out_dim: K.
    """
    sums, counts = [], []
    for tensors in groups:
        total = torch.zeros(out_dim, dtype=torch.float32, device=tensors[0].device)
        rows = 0
        for tensor in tensors:
            flat = tensor.detach().reshape(-1, out_dim)
            total += torch.sum(flat, dim=0, dtype=torch.float32)
            rows += flat.shape[0]
        sums.append(total)
        counts.append(float(rows))
    return torch.cat(sums + [torch.tensor(counts, dtype=torch.float32, device=sums[0].device)])


@torch.no_grad()
def apply_center_update(centers: Sequence[torch.Tensor], packed: torch.Tensor, momentum: float) -> None:
    """All-reduce `packed` (see `teacher_statistics`) and move each `[1, K]` centre in place:
    `c <- m * c + (1 - m) * (global column sum / global rows)`. Works without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(packed)
    num = len(centers)
    k = centers[0].shape[-1]
    rows = packed[num * k :]
    for i, center in enumerate(centers):
        batch_mean = packed[i * k : (i + 1) * k].unsqueeze(0) / rows[i]  # [1, K]
        center.mul_(momentum).add_(batch_mean * (1 - momentum))


class PendingCenterUpdate:
    """Teacher statistics of the micro-batches of one optimizer step, not yet applied.

    `add` sums packed statistics; `take` returns and clears them (None when nothing is pending);
    `discard` drops them, for an optimizer step that is skipped.
    """

    def __init__(self) -> None:
        self._packed: torch.Tensor | None = None

    def add(self, packed: torch.Tensor) -> None:
        self._packed = packed if self._packed is None else self._packed + packed

    def take(self) -> torch.Tensor | None:
        packed, self._packed = self._packed, None
        return packed

    def discard(self) -> None:
        self._packed = None

    def __bool__(self) -> bool:
        return self._packed is not None


__all__ = ["PendingCenterUpdate", "apply_center_update", "teacher_statistics"]
