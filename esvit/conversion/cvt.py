"""Rename an original CvT-v4 backbone state_dict (microsoft/esvit) into `EsViTModel` keys.

The original nests each stage as `stage{i}.0` (convolutional embedding) and `stage{i}.1.layers.{j}`
(a pair of pre-norm wrappers, `.0` attention and `.1` feed-forward, whose inner module is `.fn`).
`backbone_cvt.CvtEncoder` keeps the leaf names (`proj`, `norm`, `qkv.dw/bn/pw`, `proj_out`) and
flattens the nesting:

    stage{i}.0.{proj,norm}.*                 -> encoder.stages.{i}.patch_embed.{proj,norm}.*
    stage{i}.1.layers.{j}.0.norm.*           -> encoder.stages.{i}.blocks.{j}.norm1.*
    stage{i}.1.layers.{j}.0.fn.qkv.{dw,bn,pw}.* -> encoder.stages.{i}.blocks.{j}.attn.qkv.{dw,bn,pw}.*
    stage{i}.1.layers.{j}.0.fn.proj_out.*    -> encoder.stages.{i}.blocks.{j}.attn.proj_out.*
    stage{i}.1.layers.{j}.1.norm.*           -> encoder.stages.{i}.blocks.{j}.norm2.*
    stage{i}.1.layers.{j}.1.fn.net.{0,2}.*   -> encoder.stages.{i}.blocks.{j}.mlp.{fc1,fc2}.*
    norm.*                                   -> encoder.norm.*

The original's 1x1 convolutions (`qkv.pw`, `proj_out`, `net.0`, `net.2`) are linear layers here,
so their `[out, in, 1, 1]` weights become `[out, in]`; every other tensor is passed through
unchanged, BatchNorm running statistics and `num_batches_tracked` included.
"""

from __future__ import annotations

import re

import torch

_ENCODER = "encoder."

# (pattern over the original key, replacement, is a 1x1 convolution turned linear)
_RULES: tuple[tuple[re.Pattern[str], str, bool], ...] = tuple(
    (re.compile(pattern), replacement, pointwise)
    for pattern, replacement, pointwise in (
        (r"^stage(\d+)\.0\.(proj|norm)\.(weight|bias)$", r"stages.\1.patch_embed.\2.\3", False),
        (r"^stage(\d+)\.1\.layers\.(\d+)\.0\.norm\.(weight|bias)$", r"stages.\1.blocks.\2.norm1.\3", False),
        (r"^stage(\d+)\.1\.layers\.(\d+)\.0\.fn\.qkv\.dw\.weight$", r"stages.\1.blocks.\2.attn.qkv.dw.weight", False),
        (
            r"^stage(\d+)\.1\.layers\.(\d+)\.0\.fn\.qkv\.bn\."
            r"(weight|bias|running_mean|running_var|num_batches_tracked)$",
            r"stages.\1.blocks.\2.attn.qkv.bn.\3",
            False,
        ),
        (r"^stage(\d+)\.1\.layers\.(\d+)\.0\.fn\.qkv\.pw\.(weight|bias)$", r"stages.\1.blocks.\2.attn.qkv.pw.\3", True),
        (
            r"^stage(\d+)\.1\.layers\.(\d+)\.0\.fn\.proj_out\.(weight|bias)$",
            r"stages.\1.blocks.\2.attn.proj_out.\3",
            True,
        ),
        (r"^stage(\d+)\.1\.layers\.(\d+)\.1\.norm\.(weight|bias)$", r"stages.\1.blocks.\2.norm2.\3", False),
        (r"^stage(\d+)\.1\.layers\.(\d+)\.1\.fn\.net\.0\.(weight|bias)$", r"stages.\1.blocks.\2.mlp.fc1.\3", True),
        (r"^stage(\d+)\.1\.layers\.(\d+)\.1\.fn\.net\.2\.(weight|bias)$", r"stages.\1.blocks.\2.mlp.fc2.\3", True),
        (r"^norm\.(weight|bias)$", r"norm.\1", False),
    )
)

_UNSUPPORTED = (
    (re.compile(r"\.rel_pos_(bias_table|idx)$"), "relative-position bias (REL_POS_EMBED)"),
    (re.compile(r"^stage0\.0\.stem\."), "the ResNet stem (RES_STEM)"),
)


def original_cvt_key(key: str) -> str | None:
    """The `EsViTModel` key for one original backbone key, or None when no rule matches."""
    for pattern, replacement, _ in _RULES:
        if pattern.match(key):
            return _ENCODER + pattern.sub(replacement, key)
    return None


def original_cvt_to_esvit(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an original CvT-v4 backbone state_dict onto `EsViTModel` (`encoder.*`) keys.

    `state_dict` holds backbone keys only, without the `module.` prefix of the released
    checkpoints; head keys (`head.*`, `head_dense.*`) belong to a head converter and raise here,
    as does any key this backbone does not have.
    """
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.startswith("module."):
            raise ValueError(f"{key!r}: strip the 'module.' prefix of the checkpoint before converting.")
        if key.startswith(("head.", "head_dense.")):
            raise ValueError(f"{key!r} is a DINO head key; convert the heads separately from the backbone.")
        for pattern, feature in _UNSUPPORTED:
            if pattern.search(key):
                raise ValueError(f"{key!r}: CvT with {feature} is not supported by this implementation.")
        for pattern, replacement, pointwise in _RULES:
            if pattern.match(key):
                new_key = _ENCODER + pattern.sub(replacement, key)
                if pointwise and key.endswith(".weight"):
                    if tensor.ndim != 4 or tuple(tensor.shape[2:]) != (1, 1):
                        raise ValueError(f"{key!r}: expected a [out, in, 1, 1] weight, got {tuple(tensor.shape)}.")
                    tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
                converted[new_key] = tensor
                break
        else:
            raise ValueError(f"{key!r} is not a key of an original CvT-v4 backbone.")
    return converted


__all__ = ["original_cvt_to_esvit", "original_cvt_key"]
