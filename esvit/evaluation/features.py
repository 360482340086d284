"""Frozen-backbone feature extraction for the evaluation protocols, one or many processes.

Two features are used (Li et al., ICLR 2022, sec. 5, following DINO):

* ``"pooled"``: `model(pixel_values).pooler_output`, the view-level feature `[B, C]` (mean of the
  normed last-stage tokens, or ViL's global token). The k-NN protocol uses it.
* ``"n_last_blocks"``: `model.get_n_last_blocks_features(pixel_values, n)`, the concatenation of
  the token-averaged outputs of the last `n` blocks `[B, sum of their widths]`. The linear probe
  uses it with n = 4.

Under several processes each one runs its shard of the data, and the features are gathered with
`accelerator.gather_for_metrics`, which drops the examples the sampler repeated to even out the
last batch. Every batch also carries its dataset row `index`; the gathered features are put back
in row order and checked to be exactly rows `0 .. N-1`, so a sharding change can never silently
duplicate, drop or shuffle examples. Every process receives the full result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

__all__ = ["FEATURE_KINDS", "compute_features", "extract_features"]

FEATURE_KINDS = ("pooled", "n_last_blocks")


def compute_features(model: torch.nn.Module, pixel_values: torch.Tensor, kind: str, n: int = 4) -> torch.Tensor:
    """One batch of features `[B, D]` of the given kind (see the module docstring)."""
    if kind == "pooled":
        return model(pixel_values=pixel_values).pooler_output
    if kind == "n_last_blocks":
        if not hasattr(model, "get_n_last_blocks_features"):
            raise TypeError(
                f"{type(model).__name__} has no get_n_last_blocks_features(); use the 'pooled' features "
                "or an EsViT model."
            )
        return model.get_n_last_blocks_features(pixel_values, n)
    raise ValueError(f"unknown feature kind {kind!r}; expected one of {FEATURE_KINDS}.")


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    dataloader,
    accelerator,
    kind: str | Sequence[str] = "pooled",
    n: int = 4,
    desc: str = "features",
) -> tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor]:
    """Features and labels of a whole (prepared) dataloader, in dataset order, on the CPU.

    Args:
        model: the backbone; it is put in eval mode and on the accelerator's device, never wrapped.
        dataloader: prepared with `accelerator.prepare`, yielding dicts with `pixel_values` [B,3,H,W],
            `labels` [B] and, under several processes, the dataset row `index` [B].
        accelerator: an `accelerate.Accelerator`.
        kind: "pooled", "n_last_blocks", or a sequence of them (one pass over the data for all).
        n: number of last blocks for "n_last_blocks".

    Returns:
        `(features, labels)`: features `[N, D]` float32 (a dict kind → `[N, D_kind]` when `kind` is a
        sequence) and labels `[N]` int64, with N the number of dataset rows.
    """
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    for k in kinds:
        if k not in FEATURE_KINDS:
            raise ValueError(f"unknown feature kind {k!r}; expected one of {FEATURE_KINDS}.")
    model = accelerator.unwrap_model(model)
    model.eval()
    model.to(accelerator.device)
    dtype = next(model.parameters()).dtype

    collected: dict[str, list[torch.Tensor]] = {k: [] for k in (*kinds, "labels", "index")}
    has_index = None
    for batch in tqdm(dataloader, desc=desc, disable=not accelerator.is_local_main_process):
        if has_index is None:
            has_index = "index" in batch
            if not has_index and accelerator.num_processes > 1:
                raise ValueError("under several processes every batch must carry its dataset row 'index'.")
        pixel_values = batch["pixel_values"].to(accelerator.device, dtype=dtype)  # [B, 3, H, W]
        with accelerator.autocast():
            outputs = {k: compute_features(model, pixel_values, k, n).float() for k in kinds}  # [B, D_k]
        outputs["labels"] = batch["labels"].to(accelerator.device)  # [B]
        if has_index:
            outputs["index"] = batch["index"].to(accelerator.device)  # [B]
        gathered = accelerator.gather_for_metrics(outputs)
        for key, value in gathered.items():
            collected[key].append(value.cpu())
    if has_index is None:
        raise ValueError("the dataloader yielded no batch.")

    result = {k: torch.cat(v) for k, v in collected.items() if v}
    if has_index:
        index = result.pop("index")  # [N]
        order = index.argsort()
        expected_rows = len(dataloader.dataset) if hasattr(dataloader.dataset, "__len__") else index.numel()
        if not torch.equal(index[order], torch.arange(expected_rows)):
            raise RuntimeError(
                f"gathered {index.numel()} rows but the dataset has {expected_rows}, or rows repeat; "
                "was the dataloader prepared with accelerator.prepare (and not sharded twice)?"
            )
        result = {k: v[order] for k, v in result.items()}
    labels = result.pop("labels").long()
    features = result[kinds[0]] if isinstance(kind, str) else result
    return features, labels
