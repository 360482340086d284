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

Batches may flag rows whose image could not be decoded (`valid` [B], see
`esvit.evaluation.data.LabelledImageDataset`): their placeholder pixels still go through the model,
so every process runs the same number of batches of the same size, and the rows are dropped, with
their labels, after the gather; `return_skipped=True` also returns which rows those were.
`find_undecodable_rows` is the same gather for a decode-only pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .arguments import FEATURE_KINDS

__all__ = ["FEATURE_KINDS", "compute_features", "extract_features", "find_undecodable_rows"]


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
    return_skipped: bool = False,
) -> tuple:
    """Features and labels of a whole (prepared) dataloader, in dataset order, on the CPU.

    Args:
        model: the backbone; it is put in eval mode and on the accelerator's device, never wrapped.
        dataloader: prepared with `accelerator.prepare`, yielding dicts with `pixel_values` [B,3,H,W],
            `labels` [B], under several processes the dataset row `index` [B], and optionally `valid`
            [B] (False for an undecodable image's placeholder).
        accelerator: an `accelerate.Accelerator`.
        kind: "pooled", "n_last_blocks", or a sequence of them (one pass over the data for all).
        n: number of last blocks for "n_last_blocks".
        return_skipped: also return the dataset rows dropped as not `valid`.

    Returns:
        `(features, labels)`, or `(features, labels, skipped)` with `return_skipped`: features
        `[N, D]` float32 (a dict kind → `[N, D_kind]` when `kind` is a sequence) and labels `[N]`
        int64 of the N valid rows in dataset order, and `skipped` the int64 rows left out (sorted).
    """
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    for k in kinds:
        if k not in FEATURE_KINDS:
            raise ValueError(f"unknown feature kind {k!r}; expected one of {FEATURE_KINDS}.")
    model = accelerator.unwrap_model(model)
    model.eval()
    model.to(accelerator.device)
    dtype = next(model.parameters()).dtype

    collected: dict[str, list[torch.Tensor]] = {k: [] for k in (*kinds, "labels", "index", "valid")}
    has_index = None
    for batch in tqdm(dataloader, desc=desc, disable=not accelerator.is_local_main_process):
        if has_index is None:
            has_index = _check_index(batch, accelerator)
        pixel_values = batch["pixel_values"].to(accelerator.device, dtype=dtype)  # [B, 3, H, W]
        with accelerator.autocast():
            outputs = {k: compute_features(model, pixel_values, k, n).float() for k in kinds}  # [B, D_k]
        outputs["labels"] = batch["labels"].to(accelerator.device)  # [B]
        if has_index:
            outputs["index"] = batch["index"].to(accelerator.device)  # [B]
        if "valid" in batch:
            outputs["valid"] = batch["valid"].to(accelerator.device, dtype=torch.long)  # [B]
        gathered = accelerator.gather_for_metrics(outputs)
        for key, value in gathered.items():
            collected[key].append(value.cpu())
    if has_index is None:
        raise ValueError("the dataloader yielded no batch.")

    result = _in_row_order({k: torch.cat(v) for k, v in collected.items() if v}, dataloader)
    valid = result.pop("valid").bool() if "valid" in result else None  # [N_rows]
    skipped = torch.zeros(0, dtype=torch.long)
    if valid is not None and not bool(valid.all()):
        skipped = (~valid).nonzero().flatten()  # positions = dataset rows, once in row order
        result = {k: v[valid] for k, v in result.items()}
    labels = result.pop("labels").long()
    features = result[kinds[0]] if isinstance(kind, str) else result
    return (features, labels, skipped) if return_skipped else (features, labels)


def find_undecodable_rows(dataloader, accelerator, desc: str = "decode check") -> torch.Tensor:
    """The dataset rows flagged not `valid` by a (prepared) decode-only dataloader, sorted, int64.

    The dataloader yields `{"index": [B], "valid": [B]}` (`esvit.evaluation.data.DecodeCheckDataset`);
    every process receives the same answer.
    """
    collected: dict[str, list[torch.Tensor]] = {"index": [], "valid": []}
    has_index = None
    for batch in tqdm(dataloader, desc=desc, disable=not accelerator.is_local_main_process):
        if has_index is None:
            has_index = _check_index(batch, accelerator)
        outputs = {"valid": batch["valid"].to(accelerator.device, dtype=torch.long)}  # [B]
        if has_index:
            outputs["index"] = batch["index"].to(accelerator.device)  # [B]
        for key, value in accelerator.gather_for_metrics(outputs).items():
            collected[key].append(value.cpu())
    if has_index is None:
        raise ValueError("the dataloader yielded no batch.")
    result = _in_row_order({k: torch.cat(v) for k, v in collected.items() if v}, dataloader)
    return (result["valid"] == 0).nonzero().flatten()


def _check_index(batch: dict, accelerator) -> bool:
    has_index = "index" in batch
    if not has_index and accelerator.num_processes > 1:
        raise ValueError("under several processes every batch must carry its dataset row 'index'.")
    return has_index


def _in_row_order(result: dict[str, torch.Tensor], dataloader) -> dict[str, torch.Tensor]:
    """Gathered per-row tensors sorted by their `index` (removed), checked to be rows 0 .. N-1."""
    if "index" not in result:
        return result
    index = result.pop("index")  # [N]
    order = index.argsort()
    expected_rows = len(dataloader.dataset) if hasattr(dataloader.dataset, "__len__") else index.numel()
    if not torch.equal(index[order], torch.arange(expected_rows)):
        raise RuntimeError(
            f"gathered {index.numel()} rows but the dataset has {expected_rows}, or rows repeat; "
            "was the dataloader prepared with accelerator.prepare (and not sharded twice)?"
        )
    return {k: v[order] for k, v in result.items()}
