"""The EsViT pretraining objective: view-level DINO loss plus the region-matching loss.

Li et al., "Efficient Self-supervised Vision Transformers for Representation Learning"
(ICLR 2022, arXiv:2106.09785), §3.2, building on DINO (Caron et al., ICCV 2021, §3.1).

For every pair (teacher global view `i`, student view `v`, `v != i`):

* view level:   CE(p_t, p_s) with p_t = softmax((t_i - c_view) / tau_t) and
  p_s = log_softmax(s_v / tau_s), on the view-head outputs;
* region level: every region token `a` of student view `v` is matched to the teacher token
  `b*(a) = argmax_b cos(z_s[a], z_t[b])` of view `i`, where `z` are the *backbone* region
  features, and the same cross-entropy (with the separate centre `c_region`) is applied to the
  region-head outputs at the pairs `(a, b*(a))`, averaged over the student's tokens.

Per pair: `mean over images of (view_weight * view + region_weight * region)`; the loss is the
mean over all pairs (2 * (n_crops - 1) of them for 2 global crops). Without the region task
(`use_region_loss=False`) the pair term is the plain view cross-entropy: this is DINO's loss.

Memory: the direct implementation gathers, per pair, a `[B, T_s, K]` copy of the teacher
distribution and keeps it (and a log-softmax of the same size) for the backward pass; with the
released `K = 65536` that is gigabytes per step. `summed_cross_entropy` computes the same
numbers over chunks of student rows and re-gathers the teacher rows in the backward pass, so it
keeps nothing per pair beyond the inputs and an index vector.

Work: the pairs of one student view share its log-softmax, since
`sum_i CE(t_i, s_v) = -sum_k (sum_i t_i)_k log_softmax(s_v)_k`; the loss sums the (matched)
targets of all teacher views of a student view and runs one cross-entropy per student view, for
the view and the region term alike. A local crop pairs with both global crops, so with 2 + 8
crops this touches 170 instead of 242 student region rows per image (49 / 9 tokens), and a local
crop's gradient is written once instead of being accumulated from two pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .centering import PendingCenterUpdate, apply_center_update, teacher_statistics
from .targets import TEACHER_TARGETS, compute_dtype

# Elements of one `[rows, K]` float32 work buffer of the chunked cross-entropy (64 MiB; with
# K = 65536, 256 student tokens per chunk): few, large kernels on an accelerator.
DEFAULT_CHUNK_NUMEL = 1 << 24
# On CPU, 4 MiB (16 rows at K = 65536): the chunk's buffers then stay in cache, and temporaries
# (here: of the teacher targets) stay below glibc's mmap threshold, above which each one is mapped
# afresh and page-faulted on every use. One thread, B = 4, 2 + 8 crops, K = 65536: the loss's
# forward + backward took 0.34 s instead of 0.62 s with 256-row chunks.
CPU_CHUNK_NUMEL = 1 << 20

#: File of a saved pretraining folder that holds the loss state (the two centres), safetensors.
LOSS_STATE_FILE = "esvit_loss.safetensors"


class PreTrainingOutputLike(Protocol):
    """What `EsViTLoss` reads from the student and teacher outputs (`EsViTPreTrainingOutput`)."""

    view_logits: torch.Tensor  # [n_crops * B, K], crop-major
    region_logits: tuple[torch.Tensor, ...] | None  # per crop [B, L_c, K]
    region_features: tuple[torch.Tensor, ...] | None  # per crop [B, L_c, C]


@dataclass
class EsViTLossOutput:
    """Result of `EsViTLoss.forward`.

    Attributes:
        loss: scalar to back-propagate (mean over pairs of the weighted view + region terms).
        view_loss: detached scalar, mean over pairs of the view-level cross-entropy.
        region_loss: detached scalar, mean over pairs of the region-level cross-entropy
            (None without the region task).
        teacher_view_entropy: detached scalar, mean entropy of the centred, sharpened teacher
            view distribution. Near 0 means collapse to one prototype, near log K a uniform one.
        teacher_region_entropy: the same for the teacher's region distributions (or None).
        num_pairs: number of (teacher view, student view) pairs averaged over.
    """

    loss: torch.Tensor
    view_loss: torch.Tensor
    region_loss: torch.Tensor | None
    teacher_view_entropy: torch.Tensor
    teacher_region_entropy: torch.Tensor | None
    num_pairs: int


def _scaled_into(out: torch.Tensor, logits: torch.Tensor, temp: float) -> torch.Tensor:
    """`out <- logits / temp` in `out`'s dtype; half-precision logits are upcast before dividing."""
    if logits.dtype == out.dtype:
        return torch.div(logits, temp, out=out)
    return out.copy_(logits).div_(temp)


def _rows(buffer: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    return None if buffer is None else buffer[:rows]


def _summed_targets_into(
    out: torch.Tensor, spare: torch.Tensor | None, targets: tuple[torch.Tensor, ...], start: int, stop: int
) -> torch.Tensor:
    """`out <- sum_j probs_j[index_j[start:stop]]` for `targets = (probs_0, index_0, probs_1, ...)`;
    `spare` (same shape as `out`) receives the rows of the second and later targets."""
    torch.index_select(targets[0], 0, targets[1][start:stop], out=out)
    for j in range(2, len(targets), 2):
        out.add_(torch.index_select(targets[j], 0, targets[j + 1][start:stop], out=spare))
    return out


class _SummedCrossEntropy(torch.autograd.Function):
    """Per student row `a`: `sum_j sum_k -t_j[m_j(a), k] * log_softmax(s[a] / tau)_k`, chunked over rows.

    `sum_j CE(t_j, s) = -sum_k (sum_j t_j)_k log_softmax(s)_k`: one log-softmax per student row
    for all of its targets. Inputs: student logits `[N_s, K]`, then per target its probabilities
    `[N_j, K]` (no gradient) and its row index `[N_s]`. Only these tensors are saved for the
    backward, where the gradient `(softmax(s / tau) * sum_k T_k - T) / tau` (`T = sum_j t_j[m_j]`)
    is rebuilt chunk by chunk. A few `[chunk, K]` work buffers are reused over the chunks and the
    gradient is written in place, so no other `[*, K]` temporary is allocated.
    """

    @staticmethod
    def forward(ctx, student_logits, student_temp, chunk_rows, *targets):
        num_rows, dim = student_logits.shape
        dtype = compute_dtype(student_logits)
        out = torch.empty(num_rows, dtype=dtype, device=student_logits.device)  # [N_s]
        rows = min(chunk_rows, num_rows)
        work = torch.empty(rows, dim, dtype=dtype, device=student_logits.device)
        log_probs = torch.empty_like(work)
        spare = torch.empty_like(work) if len(targets) > 2 else None
        for start in range(0, num_rows, chunk_rows):
            stop = min(start + chunk_rows, num_rows)
            buf = work[: stop - start]
            scaled = _scaled_into(buf, student_logits[start:stop], student_temp)  # [c, K]
            log_p = torch.log_softmax(scaled, dim=-1, out=log_probs[: stop - start])
            target = _summed_targets_into(buf, _rows(spare, stop - start), targets, start, stop)  # overwrites `scaled`
            out[start:stop] = target.mul_(log_p).sum(dim=-1).neg_()
        ctx.save_for_backward(student_logits, *targets)
        ctx.student_temp = student_temp
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        student_logits, *targets = ctx.saved_tensors
        temp, chunk_rows = ctx.student_temp, ctx.chunk_rows
        num_rows, dim = student_logits.shape
        dtype = compute_dtype(student_logits)
        grad = torch.empty_like(student_logits)  # [N_s, K]
        in_place = grad.dtype == dtype  # else softmax into a work buffer, then cast into `grad`
        rows = min(chunk_rows, num_rows)
        work = torch.empty(rows, dim, dtype=dtype, device=student_logits.device)
        probs_buf = None if in_place else torch.empty_like(work)
        spare = torch.empty_like(work) if len(targets) > 2 else None
        for start in range(0, num_rows, chunk_rows):
            stop = min(start + chunk_rows, num_rows)
            buf = work[: stop - start]
            scaled = _scaled_into(buf, student_logits[start:stop], temp)
            chunk = grad[start:stop] if in_place else probs_buf[: stop - start]
            torch.softmax(scaled, dim=-1, out=chunk)
            target = _summed_targets_into(buf, _rows(spare, stop - start), targets, start, stop)
            chunk.mul_(target.sum(dim=-1, keepdim=True)).sub_(target)
            chunk.mul_((grad_out[start:stop].to(dtype) / temp).unsqueeze(-1))
            if not in_place:
                grad[start:stop] = chunk
        return grad, None, None, *([None] * len(targets))


def summed_cross_entropy(
    student_logits: torch.Tensor,
    targets: list[tuple[torch.Tensor, torch.Tensor]],
    student_temp: float,
    chunk_rows: int,
) -> torch.Tensor:
    """`sum_j CE(probs_j[index_j[a]], student_logits[a] / student_temp)` for every row `a`.

    Args:
        student_logits: `[N, K]` raw head outputs (differentiable).
        targets: `(probs [M_j, K], index [N] int64)` pairs: row `a` is trained towards
            `probs_j[index_j[a]]` for every `j` (probabilities without gradient).
        student_temp: student softmax temperature.
        chunk_rows: rows processed at once (memory and speed only, never values).

    Returns:
        `[N]` float32 (float64 for float64 logits) summed cross-entropies.
    """
    flat: list[torch.Tensor] = []
    for probs, index in targets:
        if probs.requires_grad:
            raise ValueError("target probabilities must not require grad: the teacher is not trained by the loss")
        flat += [probs, index]
    return _SummedCrossEntropy.apply(student_logits, float(student_temp), max(1, int(chunk_rows)), *flat)


def _flat_matches(teacher_probs: torch.Tensor, match_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, T_t, K]` probabilities and `[B, T_s]` per-image indices -> `[B*T_t, K]` and `[B*T_s]` row indices."""
    batch, teacher_tokens = teacher_probs.shape[:2]
    offsets = torch.arange(batch, device=match_index.device).unsqueeze(1) * teacher_tokens  # [B, 1]
    return teacher_probs.reshape(batch * teacher_tokens, -1), (match_index + offsets).reshape(-1)


def matched_region_cross_entropy(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor | list[torch.Tensor],
    match_index: torch.Tensor | list[torch.Tensor],
    student_temp: float,
    chunk_rows: int,
) -> torch.Tensor:
    """Cross-entropy of each student region token against its matched teacher token(s).

    Args:
        student_logits: `[B, T_s, K]` raw region-head outputs of one student view.
        teacher_probs: `[B, T_t, K]` centred, sharpened teacher probabilities (no gradient), or a
            list of them, one per teacher view.
        match_index: `[B, T_s]` int64, for each student token the index of its teacher token (a
            list, one per entry of `teacher_probs`, when that is a list).
        student_temp: student softmax temperature.
        chunk_rows: student tokens (over all images) processed at once.

    Returns:
        `[B, T_s]` float32 per-token cross-entropy, summed over the teacher views when several
        are given (one student log-softmax for all of them); differentiable w.r.t. `student_logits`.
    """
    if isinstance(teacher_probs, torch.Tensor):
        teacher_probs, match_index = [teacher_probs], [match_index]
    batch, student_tokens, dim = student_logits.shape
    targets = [_flat_matches(probs, index) for probs, index in zip(teacher_probs, match_index)]
    per_token = summed_cross_entropy(student_logits.reshape(-1, dim), targets, student_temp, chunk_rows)
    return per_token.view(batch, student_tokens)


def _normalized(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features.detach().to(compute_dtype(features)), p=2, dim=-1)


class EsViTLoss(nn.Module):
    """EsViT's view + region self-distillation loss (DINO's loss when `use_region_loss=False`).

    Args:
        out_dim: K, the number of prototypes of both heads.
        num_global_crops: crops seen by the teacher; they are the student's first crops.
        student_temp: student softmax temperature (0.1).
        center_momentum: EMA momentum of both centres (0.9).
        view_weight / region_weight: weights of the two terms when the region task is on
            (0.5 / 0.5 as in EsViT). Without it the view term has weight 1, as in DINO.
        use_region_loss: add the region-matching task (EsViT); False gives DINO's loss.
        region_chunk_size: student rows (region tokens over all images) per chunk of the
            cross-entropy; None picks `DEFAULT_CHUNK_NUMEL // out_dim` (`CPU_CHUNK_NUMEL // out_dim`
            on CPU), on the device of the loss's centres. It changes memory and speed, never values.
        teacher_normalization: how teacher logits become targets, a key of
            `targets.TEACHER_TARGETS`: "centering" (DINO / EsViT, the default) or
            "sinkhorn_knopp" (SwAV / DINOv2). The centres are kept up to date either way.

    Example:
        >>> loss_fn = EsViTLoss(out_dim=65536)
        >>> out = loss_fn(student(crops), teacher(crops[:2]), teacher_temp=0.04)  # doctest: +SKIP
        >>> out.loss.backward()  # doctest: +SKIP
    """

    # The centres are persistent buffers of this module (why not of a model: see `centering`), so
    # they follow `.to(device)` and are saved / restored with the loss's `state_dict`.
    view_center: torch.Tensor  # [1, K]
    region_center: torch.Tensor  # [1, K]

    def __init__(
        self,
        out_dim: int,
        num_global_crops: int = 2,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        view_weight: float = 0.5,
        region_weight: float = 0.5,
        use_region_loss: bool = True,
        region_chunk_size: int | None = None,
        teacher_normalization: str = "centering",
    ):
        super().__init__()
        if out_dim < 1 or num_global_crops < 1:
            raise ValueError(f"out_dim and num_global_crops must be >= 1, got {out_dim}, {num_global_crops}")
        if region_chunk_size is not None and region_chunk_size < 1:
            raise ValueError(f"region_chunk_size must be >= 1 or None, got {region_chunk_size}")
        if teacher_normalization not in TEACHER_TARGETS:
            raise ValueError(
                f"teacher_normalization must be one of {sorted(TEACHER_TARGETS)}, got {teacher_normalization!r}"
            )
        self.out_dim = out_dim
        self.num_global_crops = num_global_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.view_weight = view_weight
        self.region_weight = region_weight
        self.use_region_loss = use_region_loss
        self._region_chunk_size = region_chunk_size
        self.teacher_normalization = teacher_normalization
        self._teacher_targets = TEACHER_TARGETS[teacher_normalization]
        self.register_buffer("view_center", torch.zeros(1, out_dim))
        self.register_buffer("region_center", torch.zeros(1, out_dim))
        # Teacher statistics added up over the micro-batches of one optimizer step (see forward).
        self.pending = PendingCenterUpdate()

    @property
    def region_chunk_size(self) -> int:
        """Student rows per chunk of the cross-entropy (the argument, or the default for the device)."""
        if self._region_chunk_size is not None:
            return self._region_chunk_size
        numel = CPU_CHUNK_NUMEL if self.view_center.device.type == "cpu" else DEFAULT_CHUNK_NUMEL
        return max(1, numel // self.out_dim)

    def extra_repr(self) -> str:
        return (
            f"out_dim={self.out_dim}, num_global_crops={self.num_global_crops}, "
            f"student_temp={self.student_temp}, center_momentum={self.center_momentum}, "
            f"use_region_loss={self.use_region_loss}, view_weight={self.view_weight}, "
            f"region_weight={self.region_weight}, region_chunk_size={self.region_chunk_size}, "
            f"teacher_normalization={self.teacher_normalization!r}"
        )

    # ------------------------------------------------------------------ input checks
    def _check_inputs(self, student: PreTrainingOutputLike, teacher: PreTrainingOutputLike) -> tuple[int, int]:
        """Validate shapes; return (batch size B, number of student crops)."""
        t_view, s_view = teacher.view_logits, student.view_logits
        if t_view.ndim != 2 or s_view.ndim != 2 or t_view.shape[1] != self.out_dim or s_view.shape[1] != self.out_dim:
            raise ValueError(
                f"view_logits must be [rows, {self.out_dim}]; got student {tuple(s_view.shape)}, "
                f"teacher {tuple(t_view.shape)}"
            )
        if t_view.shape[0] % self.num_global_crops:
            raise ValueError(
                f"teacher view_logits has {t_view.shape[0]} rows, not a multiple of "
                f"num_global_crops={self.num_global_crops}"
            )
        batch = t_view.shape[0] // self.num_global_crops
        if s_view.shape[0] % batch:
            raise ValueError(f"student view_logits has {s_view.shape[0]} rows, not a multiple of B={batch}")
        num_crops = s_view.shape[0] // batch
        if num_crops < 2 or num_crops < self.num_global_crops:
            raise ValueError(
                f"the student must see the {self.num_global_crops} teacher crops plus at least one other; "
                f"got {num_crops} crops"
            )
        if not self.use_region_loss:
            return batch, num_crops
        for name, out, expected in (("student", student, num_crops), ("teacher", teacher, self.num_global_crops)):
            logits, features = out.region_logits, out.region_features
            if logits is None or features is None or len(logits) != expected or len(features) != expected:
                raise ValueError(
                    f"{name} needs region_logits and region_features for each of its {expected} crops "
                    "(or construct EsViTLoss with use_region_loss=False)"
                )
            for crop, (lg, ft) in enumerate(zip(logits, features)):
                if lg.ndim != 3 or lg.shape[0] != batch or lg.shape[2] != self.out_dim:
                    raise ValueError(
                        f"{name} region_logits[{crop}] must be [B={batch}, L, {self.out_dim}], got {tuple(lg.shape)}"
                    )
                if ft.ndim != 3 or ft.shape[:2] != lg.shape[:2]:
                    raise ValueError(
                        f"{name} region_features[{crop}] must be [B, L={lg.shape[1]}, C], got {tuple(ft.shape)}"
                    )
        return batch, num_crops

    # ------------------------------------------------------------------ loss
    def forward(
        self,
        student: PreTrainingOutputLike,
        teacher: PreTrainingOutputLike,
        teacher_temp: float,
        update_centers: bool = True,
    ) -> EsViTLossOutput:
        """Loss for one batch; then the centres move towards this batch's teacher statistics.

        Args:
            student: outputs for all crops (the teacher's global crops first, crop-major rows).
            teacher: outputs for the `num_global_crops` global crops.
            teacher_temp: teacher softmax temperature for this step (see `schedules`).
            update_centers: False under gradient accumulation: the batch's teacher statistics are
                only added up, and `step_centers()` moves the centres once per optimizer step by
                the mean over all its micro-batches, exactly as one large batch would.
        """
        batch, num_crops = self._check_inputs(student, teacher)
        device = student.view_logits.device
        # All of the loss runs in float32: centring, sharpening and the cosine matching are
        # sensitive to half precision, and an outer autocast would otherwise lower the matmuls.
        with torch.autocast(device_type=device.type, enabled=False):
            result = self._loss(student, teacher, float(teacher_temp), batch, num_crops)
        if update_centers:
            self.update_centers(teacher)
        else:
            self.pending.add(self._teacher_statistics(teacher))
        return result

    def step_centers(self) -> None:
        """Apply the statistics added up by `forward(..., update_centers=False)` (no-op if none)."""
        packed = self.pending.take()
        if packed is not None:
            self._apply_statistics(packed)

    def discard_pending_centers(self) -> None:
        """Forget the statistics of a step that is skipped (e.g. a non-finite loss)."""
        self.pending.discard()

    def _loss(
        self,
        student: PreTrainingOutputLike,
        teacher: PreTrainingOutputLike,
        teacher_temp: float,
        batch: int,
        num_crops: int,
    ) -> EsViTLossOutput:
        chunk = self.region_chunk_size
        t_view = teacher.view_logits.detach()  # [G*B, K]
        # one chunk: the view rows are few, and one softmax keeps the values the original's
        t_view_probs, view_entropy = self._teacher_targets(t_view, self.view_center, teacher_temp, t_view.shape[0])
        view_entropy = view_entropy / t_view.shape[0]
        teacher_view = t_view_probs.chunk(self.num_global_crops)  # G x [B, K]
        student_view = student.view_logits.chunk(num_crops)  # n x [B, K]
        same_row = torch.arange(batch, device=t_view_probs.device)  # view targets: image b <-> image b

        teacher_region: list[torch.Tensor] = []
        teacher_feat: list[torch.Tensor] = []
        student_feat: list[torch.Tensor] = []
        region_entropy = None
        if self.use_region_loss:
            entropy_sum = torch.zeros((), device=t_view_probs.device)
            token_count = 0
            for logits, feats in zip(teacher.region_logits, teacher.region_features):
                flat = logits.detach().reshape(-1, logits.shape[-1])  # [B * T_t, K]
                probs, ent = self._teacher_targets(flat, self.region_center, teacher_temp, chunk)
                teacher_region.append(probs.view(logits.shape))  # [B, T_t, K]
                teacher_feat.append(_normalized(feats))  # [B, T_t, C]
                entropy_sum += ent
                token_count += logits.shape[0] * logits.shape[1]
            region_entropy = entropy_sum / token_count
            student_feat = [_normalized(f) for f in student.region_features]  # n x [B, T_s, C]

        # Every pair (teacher view i, student view v != i) is a cross-entropy against the student's
        # log-softmax of view v, so the pairs of one student view share it: summing the teacher
        # targets first, sum_i CE(t_i, s_v) = CE(sum_i t_i, s_v), gives one log-softmax per student
        # view (a local crop pairs with every teacher view) instead of one per pair. Per pair,
        # only the region matching differs; the matched targets are summed token by token.
        total = torch.zeros((), device=t_view_probs.device)
        view_total = torch.zeros((), device=t_view_probs.device)
        region_total = torch.zeros((), device=t_view_probs.device)
        num_pairs = 0
        for v in range(num_crops):
            partners = [i for i in range(self.num_global_crops) if i != v]  # not the teacher's own view
            if not partners:
                continue
            view_targets = [(teacher_view[i], same_row) for i in partners]
            view_ce = summed_cross_entropy(student_view[v], view_targets, self.student_temp, chunk)  # [B]
            crop_loss = view_ce
            if self.use_region_loss:
                with torch.no_grad():  # [B, T_s] index of the most similar teacher token, per partner
                    matches = [
                        torch.matmul(student_feat[v], teacher_feat[i].transpose(1, 2)).max(dim=2)[1] for i in partners
                    ]
                region_ce = matched_region_cross_entropy(
                    student.region_logits[v], [teacher_region[i] for i in partners], matches, self.student_temp, chunk
                ).mean(-1)  # [B]
                crop_loss = self.view_weight * view_ce + self.region_weight * region_ce
                region_total += region_ce.detach().mean()
            total = total + crop_loss.mean()
            view_total += view_ce.detach().mean()
            num_pairs += len(partners)
        return EsViTLossOutput(
            loss=total / num_pairs,
            view_loss=view_total / num_pairs,
            region_loss=region_total / num_pairs if self.use_region_loss else None,
            teacher_view_entropy=view_entropy,
            teacher_region_entropy=region_entropy,
            num_pairs=num_pairs,
        )

    # ------------------------------------------------------------------ centres
    @torch.no_grad()
    def update_centers(self, teacher: PreTrainingOutputLike) -> None:
        """EMA of the batch means of the teacher outputs, averaged over all processes."""
        self._apply_statistics(self._teacher_statistics(teacher))

    def _teacher_statistics(self, teacher: PreTrainingOutputLike) -> torch.Tensor:
        """This process's packed column sums and row counts of the teacher outputs (view, and
        region with the region task), see `centering.teacher_statistics`."""
        groups = [[teacher.view_logits]]
        if self.use_region_loss:
            groups.append(list(teacher.region_logits))
        return teacher_statistics(groups, self.out_dim)

    def _apply_statistics(self, packed: torch.Tensor) -> None:
        """Move both centres towards the global batch means (one all-reduce for both)."""
        centers = [self.view_center, self.region_center] if self.use_region_loss else [self.view_center]
        apply_center_update(centers, packed, self.center_momentum)


__all__ = [
    "LOSS_STATE_FILE",
    "EsViTLoss",
    "EsViTLossOutput",
    "matched_region_cross_entropy",
    "summed_cross_entropy",
]
