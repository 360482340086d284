"""Map the Swin backbone weights of an original EsViT checkpoint onto `EsViTModel` keys.

`SwinEncoder` keeps the original parameter names, so the mapping is: add the `encoder.` prefix,
drop the buffers that the encoder derives itself (the relative-position index, and the shift
attention mask that older Swin code stored), and refuse everything else that is not a known
backbone key. The DINO heads (`head.*`, `head_dense.*`) live beside the backbone in the original
module; they are mapped by the head converter, so they are rejected here rather than silently
dropped. Training-only: not imported by `modeling_esvit.py`.
"""

from __future__ import annotations

import re

import torch

ENCODER_PREFIX = "encoder."

_BLOCK = r"layers\.\d+\.blocks\.\d+\."
_AFFINE = r"\.(weight|bias)"

#: Original backbone parameters, kept under the same name (plus `encoder.`).
BACKBONE_KEY_PATTERNS: tuple[re.Pattern, ...] = tuple(
    re.compile(p)
    for p in (
        r"patch_embed\.proj" + _AFFINE,
        r"patch_embed\.norm" + _AFFINE,
        r"absolute_pos_embed",
        _BLOCK + r"norm[12]" + _AFFINE,
        _BLOCK + r"attn\.(qkv|proj)" + _AFFINE,
        _BLOCK + r"attn\.relative_position_bias_table",
        _BLOCK + r"mlp\.fc[12]" + _AFFINE,
        r"layers\.\d+\.downsample\.reduction\.weight",
        r"layers\.\d+\.downsample\.norm" + _AFFINE,
        r"norm" + _AFFINE,
    )
)

#: Buffers of the original that are functions of the architecture alone; the encoder rebuilds them.
DERIVED_BUFFER_PATTERNS: tuple[re.Pattern, ...] = (
    re.compile(_BLOCK + r"attn\.relative_position_index"),
    re.compile(_BLOCK + r"attn_mask"),
)

_HEAD_PATTERN = re.compile(r"(head|head_dense)(\..*)?")


def is_derived_buffer(key: str) -> bool:
    """True for original keys that are rebuilt from the architecture instead of loaded."""
    return any(p.fullmatch(key) for p in DERIVED_BUFFER_PATTERNS)


def original_swin_to_esvit(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original `SwinTransformer` backbone state_dict -> `EsViTModel` state_dict entries.

    Args:
        state_dict: backbone keys exactly as the original module names them, without the
            `module.` prefix of DistributedDataParallel and without the heads.

    Returns:
        `{"encoder.<key>": tensor}` for every parameter; derived buffers are left out.

    Raises:
        ValueError: naming every key that is a head key, carries a wrapper prefix, or is not a
            known Swin backbone key.
    """
    converted: dict[str, torch.Tensor] = {}
    heads, prefixed, unknown = [], [], []
    for key, value in state_dict.items():
        if is_derived_buffer(key):
            continue
        if any(p.fullmatch(key) for p in BACKBONE_KEY_PATTERNS):
            converted[ENCODER_PREFIX + key] = value
        elif _HEAD_PATTERN.fullmatch(key):
            heads.append(key)
        elif key.startswith(("module.", "backbone.")):
            prefixed.append(key)
        else:
            unknown.append(key)
    problems = []
    if heads:
        problems.append(
            f"head keys {sorted(heads)[:4]}{' ...' if len(heads) > 4 else ''} ({len(heads)} in all): "
            "split the DINO heads off and convert them separately"
        )
    if prefixed:
        problems.append(
            f"keys with a wrapper prefix {sorted(prefixed)[:4]} ({len(prefixed)} in all): strip 'module.' first"
        )
    if unknown:
        problems.append(f"keys that are not Swin backbone keys: {sorted(unknown)}")
    if problems:
        raise ValueError("cannot convert this Swin state_dict; " + "; ".join(problems) + ".")
    return converted


__all__ = [
    "BACKBONE_KEY_PATTERNS",
    "DERIVED_BUFFER_PATTERNS",
    "ENCODER_PREFIX",
    "is_derived_buffer",
    "original_swin_to_esvit",
]
