"""Convert original EsViT ViL (`MsViT`) backbone weights to `EsViTModel` keys.

The original builds each stage as one `nn.Sequential`: index 0 is the patch embedding, then an
attention block and an MLP block alternate (`layer{s}.{2j+1}` / `layer{s}.{2j+2}` form block j).
Here a block holds both halves, so the mapping is

    layer{s}.0.proj / norm_embed / cls_token        -> encoder.stages.{s-1}.embeddings.projection / norm / global_tokens
    layer{s}.0.cls_pos_embed / x_pos_embed / y_pos_embed
                                                    -> ...embeddings.global_position_embeddings / row_... / column_...
    layer{s}.{2j+1}.norm                            -> encoder.stages.{s-1}.blocks.{j}.attention_norm
    layer{s}.{2j+1}.attn.query / kv / proj / qkv    -> ...blocks.{j}.attention.query / key_value / proj / qkv
    layer{s}.{2j+1}.attn.local_relative_position_bias_table
                                                    -> ...blocks.{j}.attention.relative_position_bias_table
    layer{s}.{2j+1}.attn.g2l_ / g2g_relative_position_bias
                                                    -> ...blocks.{j}.attention.global_local_bias / global_global_bias
    layer{s}.{2j+2}.norm / mlp.fc1 / mlp.fc2        -> ...blocks.{j}.mlp_norm / mlp.fc1 / mlp.fc2
    norm                                            -> encoder.norm

Two kinds of original keys have no counterpart, and are dropped deliberately:
* `*.attn.relative_position_index`: derived from the window / grid size, rebuilt by the model;
* `*.attn.{query,kv,proj}_global.*`: with `SHARE_W` the global projections ARE the local ones,
  registered twice, so checkpoints store each tensor twice. They are checked to be equal (a
  checkpoint trained without weight sharing cannot be represented and is rejected).

Backbone keys only: strip `module.` and split off `head.*` / `head_dense.*` before calling.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

#: Original attention-module names that are aliases of another parameter (SHARE_W).
ALIAS_TARGETS = {"query_global": "query", "kv_global": "kv", "proj_global": "proj"}
#: Original buffers derived from the architecture; rebuilt by the model, never loaded.
DERIVED_BUFFERS = ("relative_position_index",)

_EMBEDDING_NAMES = {
    "proj": "projection",
    "norm_embed": "norm",
    "cls_token": "global_tokens",
    "cls_pos_embed": "global_position_embeddings",
    "x_pos_embed": "row_position_embeddings",
    "y_pos_embed": "column_position_embeddings",
}
_ATTENTION_NAMES = {
    "query": "query",
    "kv": "key_value",
    "qkv": "qkv",
    "proj": "proj",
    "local_relative_position_bias_table": "relative_position_bias_table",
    "g2l_relative_position_bias": "global_local_bias",
    "g2g_relative_position_bias": "global_global_bias",
}

_STAGE_KEY = re.compile(r"^layer(?P<stage>[1-9])\.(?P<index>\d+)\.(?P<rest>.+)$")
_ALIAS_KEY = re.compile(
    r"^(?P<prefix>layer[1-9]\.\d+\.attn\.)(?P<name>query_global|kv_global|proj_global)\.(?P<leaf>weight|bias)$"
)
_DERIVED_KEY = re.compile(r"^layer[1-9]\.\d+\.attn\.relative_position_index$")


def key_role(key: str) -> str:
    """ "alias" (a `*_global` duplicate), "derived" (an index buffer) or "weight" (converted)."""
    if _ALIAS_KEY.match(key):
        return "alias"
    if _DERIVED_KEY.match(key):
        return "derived"
    return "weight"


def alias_source(key: str) -> str:
    """The original key a `*_global` alias duplicates, e.g. `layer1.1.attn.query.weight`."""
    match = _ALIAS_KEY.match(key)
    if match is None:
        raise ValueError(f"{key!r} is not an aliased `*_global` key.")
    return f"{match['prefix']}{ALIAS_TARGETS[match['name']]}.{match['leaf']}"


def rename_key(key: str) -> str:
    """The `EsViTModel` key of one original backbone weight (raises on anything else)."""
    if key.startswith("module."):
        raise ValueError(f"{key!r}: strip the DistributedDataParallel `module.` prefix first.")
    if key.startswith(("head.", "head_dense.")):
        raise ValueError(f"{key!r}: DINO head weights are not backbone weights; convert them separately.")
    if key_role(key) != "weight":
        raise ValueError(f"{key!r} is an alias or a derived buffer and has no counterpart; it is dropped.")
    if key in ("norm.weight", "norm.bias"):
        return f"encoder.{key}"
    match = _STAGE_KEY.match(key)
    if match is None:
        raise ValueError(f"unknown ViL key {key!r}.")
    stage, index, rest = int(match["stage"]) - 1, int(match["index"]), match["rest"]
    prefix = f"encoder.stages.{stage}"
    if index == 0:
        name, _, leaf = rest.partition(".")
        if name in _EMBEDDING_NAMES:
            return f"{prefix}.embeddings.{_EMBEDDING_NAMES[name]}" + (f".{leaf}" if leaf else "")
        raise ValueError(f"unknown ViL patch-embedding key {key!r}.")
    block = (index - 1) // 2
    is_attention = index % 2 == 1
    prefix = f"{prefix}.blocks.{block}"
    if rest in ("norm.weight", "norm.bias"):
        return f"{prefix}.{'attention_norm' if is_attention else 'mlp_norm'}.{rest.split('.')[1]}"
    if is_attention and rest.startswith("attn."):
        name, _, leaf = rest[len("attn.") :].partition(".")
        if name in _ATTENTION_NAMES:
            return f"{prefix}.attention.{_ATTENTION_NAMES[name]}" + (f".{leaf}" if leaf else "")
    if not is_attention and re.fullmatch(r"mlp\.fc[12]\.(weight|bias)", rest):
        return f"{prefix}.{rest}"
    raise ValueError(f"unknown ViL key {key!r}.")


def original_vil_to_esvit(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original `MsViT` backbone state_dict -> `EsViTModel` state_dict (keys prefixed `encoder.`).

    Raises `ValueError` on head or `module.`-prefixed keys, on unknown keys, on a `*_global` alias
    without its local tensor, and on an alias whose value differs from the local tensor.
    """
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        role = key_role(key)
        if role == "derived":
            continue
        if role == "alias":
            source = alias_source(key)
            if source not in state_dict:
                raise ValueError(f"{key!r} aliases {source!r}, which is missing from the state_dict.")
            if not torch.equal(value, state_dict[source]):
                raise ValueError(
                    f"{key!r} differs from {source!r}: this checkpoint was trained with separate global "
                    "projections (SHARE_W off), which this implementation does not support."
                )
            continue
        converted[rename_key(key)] = value
    return converted


__all__ = ["original_vil_to_esvit", "rename_key", "key_role", "alias_source", "ALIAS_TARGETS", "DERIVED_BUFFERS"]
