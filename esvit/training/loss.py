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
released `K = 65536` that is gigabytes per step. `matched_region_cross_entropy` computes the same
numbers over chunks of student tokens and re-gathers the teacher rows in the backward pass, so it
keeps nothing per pair beyond the inputs and an index vector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .centering import PendingCenterUpdate, apply_center_update, teacher_statistics
from .targets import TEACHER_TARGETS, compute_dtype

# Elements of one `[rows, K]` float32 temporary in the chunked region loss (64 MiB). With
# K = 65536 that is 256 student tokens per chunk.
DEFAULT_CHUNK_NUMEL = 1 << 24

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


class _MatchedRegionCrossEntropy(torch.autograd.Function):
    """Per-token `sum_k -t[m(a), k] * log_softmax(s[a] / tau)_k`, chunked over student tokens.

    Inputs: student logits `[N_s, K]`, teacher probabilities `[N_t, K]` (no gradient), match index
    `[N_s]` (rows of the teacher tensor). Only these three tensors are saved for backward; the
    gradient `(softmax(s / tau) * sum(t) - t) / tau` is rebuilt chunk by chunk.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_probs, match_index, student_temp, chunk_rows):
        num_rows = student_logits.shape[0]
        dtype = compute_dtype(student_logits)
        out = torch.empty(num_rows, dtype=dtype, device=student_logits.device)  # [N_s]
        for start in range(0, num_rows, chunk_rows):
            stop = min(start + chunk_rows, num_rows)
            scaled = student_logits[start:stop].to(dtype) / student_temp  # [c, K]
            target = teacher_probs.index_select(0, match_index[start:stop])  # [c, K]
            out[start:stop] = torch.sum(-target * F.log_softmax(scaled, dim=-1), dim=-1)
        ctx.save_for_backward(student_logits, teacher_probs, match_index)
        ctx.student_temp = student_temp
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        student_logits, teacher_probs, match_index = ctx.saved_tensors
        temp, chunk_rows = ctx.student_temp, ctx.chunk_rows
        grad = torch.empty_like(student_logits)  # [N_s, K]
        dtype = compute_dtype(student_logits)
        for start in range(0, student_logits.shape[0], chunk_rows):
            stop = min(start + chunk_rows, student_logits.shape[0])
            scaled = student_logits[start:stop].to(dtype) / temp
            target = teacher_probs.index_select(0, match_index[start:stop])
            chunk = torch.softmax(scaled, dim=-1) * target.sum(dim=-1, keepdim=True) - target
            chunk.mul_((grad_out[start:stop].to(dtype) / temp).unsqueeze(-1))
            grad[start:stop] = chunk.to(grad.dtype)
        return grad, None, None, None, None


def matched_region_cross_entropy(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    match_index: torch.Tensor,
    student_temp: float,
    chunk_rows: int,
) -> torch.Tensor:
    """Cross-entropy of each student region token against its matched teacher token.

    Args:
        student_logits: `[B, T_s, K]` raw region-head outputs of one student view.
        teacher_probs: `[B, T_t, K]` centred, sharpened teacher probabilities (no gradient).
        match_index: `[B, T_s]` int64, for each student token the index of its teacher token.
        student_temp: student softmax temperature.
        chunk_rows: student tokens (over all images) processed at once.

    Returns:
        `[B, T_s]` float32 per-token cross-entropy; differentiable w.r.t. `student_logits`.
    """
    if teacher_probs.requires_grad:
        raise ValueError("teacher_probs must not require grad: the teacher is not trained by the loss")
    batch, student_tokens, dim = student_logits.shape
    teacher_tokens = teacher_probs.shape[1]
    offsets = torch.arange(batch, device=match_index.device).unsqueeze(1) * teacher_tokens  # [B, 1]
    flat_index = (match_index + offsets).reshape(-1)  # [B * T_s]
    per_token = _MatchedRegionCrossEntropy.apply(
        student_logits.reshape(-1, dim),
        teacher_probs.reshape(-1, dim),
        flat_index,
        float(student_temp),
        max(1, int(chunk_rows)),
    )
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
        region_chunk_size: student region tokens (over all images) per chunk of the region loss;
            None picks `DEFAULT_CHUNK_NUMEL // out_dim`. It changes memory and speed, never values.
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
        self.region_chunk_size = region_chunk_size or max(1, DEFAULT_CHUNK_NUMEL // out_dim)
        self.teacher_normalization = teacher_normalization
        self._teacher_targets = TEACHER_TARGETS[teacher_normalization]
        self.register_buffer("view_center", torch.zeros(1, out_dim))
        self.register_buffer("region_center", torch.zeros(1, out_dim))
        # Teacher statistics added up over the micro-batches of one optimizer step (see forward).
        self.pending = PendingCenterUpdate()

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
        s_view = student.view_logits
        student_view = (s_view.to(compute_dtype(s_view)) / self.student_temp).chunk(num_crops)  # n x [B, K]
        student_view_log = [F.log_softmax(s, dim=-1) for s in student_view]

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

        total = torch.zeros((), device=t_view_probs.device)
        view_total = torch.zeros((), device=t_view_probs.device)
        region_total = torch.zeros((), device=t_view_probs.device)
        num_pairs = 0
        for iq, target in enumerate(teacher_view):
            for v in range(num_crops):
                if v == iq:  # the student is not asked to predict the teacher's own view
                    continue
                view_ce = torch.sum(-target * student_view_log[v], dim=-1)  # [B]
                if self.use_region_loss:
                    with torch.no_grad():
                        similarity = torch.matmul(student_feat[v], teacher_feat[iq].transpose(1, 2))  # [B, T_s, T_t]
                        match = similarity.max(dim=2)[1]  # [B, T_s]
                    region_ce = matched_region_cross_entropy(
                        student.region_logits[v], teacher_region[iq], match, self.student_temp, chunk
                    ).mean(-1)  # [B]
                    pair_loss = self.view_weight * view_ce + self.region_weight * region_ce
                    region_total += region_ce.detach().mean()
                else:
                    pair_loss = view_ce
                total = total + pair_loss.mean()
                view_total += view_ce.detach().mean()
                num_pairs += 1
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
]
