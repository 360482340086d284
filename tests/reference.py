"""One source for the tests' tiny model configs and for reading the original code's reference fixtures.

The reference outputs of the original EsViT code live in ``../shared/fixtures/esvit_reference``
beside the checkout, or wherever ``ESVIT_REFERENCE_DIR`` points; their README says which original
function produced each tensor. This module only reads them: it never writes there, and it imports
neither pytest nor anything under ``tests`` (``benchmarks/parity_report.py`` uses it too, after
putting the repository root on ``sys.path``). The pytest fixtures that skip (or, under CI, fail)
when the folder is absent are in ``conftest.py``, built on the functions here.

Two kinds of configs:

* :func:`reference_config` builds the ``EsViTConfig`` of one reference model from the original
  constructor and head arguments recorded in the manifest (parity tests, the parity report);
* :func:`tiny_config` gives the same tiny backbones (widths 8-64, heads 1-4) without reading any
  file, for the tests that must run where the fixtures are absent. Heads stay at the
  ``EsViTConfig`` defaults unless passed, e.g. ``tiny_config("cvt", **REFERENCE_HEADS)``.

    >>> tiny_config("swin", depths=(1, 1, 1, 1)).window_size
    7
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from esvit.configuration_esvit import EsViTConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(
    os.environ.get("ESVIT_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "fixtures" / "esvit_reference")
)
REFERENCE_MODELS = ("swin_tiny_w7", "swin_tiny_w14", "vil_tiny", "cvt_tiny")
HEAD_PREFIXES = ("head.", "head_dense.")  # the original attaches both heads to the backbone

# ------------------------------------------------------------------------------- tiny configs
_STAGES = dict(hidden_sizes=(8, 16, 32, 64), num_heads=(1, 2, 2, 4), window_size=7, drop_path_rate=0.0)
# The backbones of the reference models, field for field (`reference_config` gives the same values).
TINY_BACKBONES: dict[str, dict] = {
    "swin": dict(_STAGES, backbone_type="swin", depths=(2, 2, 2, 2), patch_sizes=(4, 2, 2, 2), layer_norm_eps=1e-6),
    "vil": dict(
        _STAGES,
        backbone_type="vil",
        depths=(1, 2, 2, 2),
        patch_sizes=(4, 2, 2, 2),
        layer_norm_eps=1e-6,
        vil_attention_types=("longformer", "longformer", "full", "full"),
        vil_num_global_tokens=(1, 1, 1, 0),
        vil_mode=1,
    ),
    "cvt": dict(
        _STAGES,
        backbone_type="cvt",
        depths=(1, 2, 2, 2),
        patch_sizes=(7, 3, 3, 3),
        patch_strides=(4, 2, 2, 2),
        patch_padding=(2, 1, 1, 1),
        layer_norm_eps=1e-5,
        cvt_qkv_kernel_size=3,
        cvt_qkv_padding=1,
    ),
}
FAMILIES = tuple(sorted(TINY_BACKBONES))
# The DINO heads of every reference model (manifest: out_dim 64, hidden 64, bottleneck 32, 3 layers,
# no BatchNorm, norm_last_layer False); the sizes alone leave norm_last_layer at its default (True).
REFERENCE_HEAD_SIZES = dict(head_out_dim=64, head_hidden_dim=64, head_bottleneck_dim=32)
REFERENCE_HEADS = dict(REFERENCE_HEAD_SIZES, head_norm_last_layer=False)


def tiny_config(family: str, **overrides) -> EsViTConfig:
    """The tiny backbone of `family` ("swin", "vil" or "cvt"); `overrides` replace any field."""
    if family not in TINY_BACKBONES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return EsViTConfig(**{**TINY_BACKBONES[family], **overrides})


# ------------------------------------------------------------------------------------ parity
#: The tolerances of every comparison with the original code's outputs (float32, CPU).
PARITY_ATOL, PARITY_RTOL = 1e-5, 1e-4
#: Encoder outputs the fixtures hold for every reference model.
FEATURES = ("pooled_global", "region_global", "pooled_local", "region_local", "linear_n1", "linear_n4", "linear_n5")


def strip_encoder_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`EsViTModel` keys (`encoder.*`) -> the encoder's own keys."""
    assert all(k.startswith("encoder.") for k in state), "not EsViTModel encoder keys"
    return {k.removeprefix("encoder."): v for k, v in state.items()}


@torch.no_grad()
def encoder_features(encoder, inputs: dict, implementation: str) -> dict[str, torch.Tensor]:
    """The `FEATURES` of an encoder on the fixtures' first global and local view."""
    glob = encoder(inputs["global_view1"], output_block_features=True, attn_implementation=implementation)
    local = encoder(inputs["local_view1"], attn_implementation=implementation)
    blocks = glob.block_features
    return {
        "pooled_global": glob.pooler_output,
        "region_global": glob.last_hidden_state,
        "pooled_local": local.pooler_output,
        "region_local": local.last_hidden_state,
        **{f"linear_n{n}": torch.cat(blocks[-n:], dim=-1) for n in (1, 4, 5)},
    }


def assert_matches_reference(label: str, got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Print the max abs difference of every tensor, then compare each at the parity tolerances."""
    diffs = {k: (got[k] - expected[k]).abs().max().item() for k in got}
    print(f"\n[{label}] max abs diff: " + ", ".join(f"{k}={v:.2e}" for k, v in diffs.items()))
    for key in got:
        torch.testing.assert_close(
            got[key], expected[key], atol=PARITY_ATOL, rtol=PARITY_RTOL, msg=lambda m, key=key: f"{label} {key}: {m}"
        )


# ---------------------------------------------------------------------------------- fixtures
def reference_missing(folder: Path = REFERENCE_DIR) -> str | None:
    """Why the reference fixtures cannot be read from `folder`, or None when they can."""
    if (Path(folder) / "manifest.json").is_file():
        return None
    return f"reference fixtures not found at {folder} (set ESVIT_REFERENCE_DIR or place ../shared beside the checkout)"


def load_manifest(folder: Path = REFERENCE_DIR) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text())


def load_reference_inputs(folder: Path = REFERENCE_DIR) -> dict[str, torch.Tensor]:
    """The shared input batch as float32: global_view1/2 [2,3,224,224], local_view1/2 [2,3,96,96]."""
    return {k: v.float() for k, v in load_file(Path(folder) / "inputs.safetensors").items()}


def load_reference_outputs(folder: Path, manifest: dict, name: str) -> dict[str, torch.Tensor]:
    """The original model's stored outputs (pooled / region / multi-crop heads / n-last-blocks)."""
    return load_file(Path(folder) / manifest["models"][name]["files"]["outputs"])


def load_reference_state_dict(folder: Path, manifest: dict, name: str) -> dict[str, torch.Tensor]:
    """The original model's full state_dict (backbone + heads), integer index buffers restored."""
    folder = Path(folder)
    state = load_file(folder / f"{name}.weights.safetensors")
    index_file = folder / f"{name}.index_buffers.safetensors"
    if index_file.is_file():
        buffers = load_file(index_file)
        for key, entry in manifest["models"][name].get("index_buffer_map", {}).items():
            state[key] = buffers[entry].long()
    return state


def split_heads(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An original state_dict -> (backbone keys, `head.*` / `head_dense.*` keys)."""
    heads = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIXES)}
    return {k: v for k, v in state.items() if k not in heads}, heads


# --------------------------------------------------------------------- configs from the manifest
def reference_config(manifest: dict, name: str, *, heads: bool = True, **overrides) -> EsViTConfig:
    """The EsViTConfig of reference model `name`, from the original constructor arguments recorded
    in the manifest; with `heads`, also the original DINO head arguments (else the config defaults).
    `overrides` replace any field."""
    entry = manifest["models"][name]
    family = entry["original_class"].split("::")[-1]
    parsers = {"SwinTransformer": _swin_kwargs, "MsViT": _vil_kwargs, "CvT": _cvt_kwargs}
    if family not in parsers:
        raise ValueError(f"{name}: no EsViT equivalent of the original class {entry['original_class']}")
    kwargs = parsers[family](entry["constructor_kwargs"])
    if heads:
        kwargs.update(_head_kwargs(entry["heads"]))
    return EsViTConfig(**{**kwargs, **overrides})


def _swin_kwargs(kwargs: dict) -> dict:
    """`models/swin_transformer.py::SwinTransformer(**kwargs)` as EsViTConfig fields."""
    assert kwargs["norm_layer"] == "partial(nn.LayerNorm, eps=1e-6)" and kwargs["qk_scale"] is None
    depth = len(kwargs["depths"])
    return dict(
        backbone_type="swin",
        image_size=kwargs["img_size"],
        num_channels=kwargs["in_chans"],
        hidden_sizes=tuple(kwargs["embed_dim"] * 2**i for i in range(depth)),
        depths=tuple(kwargs["depths"]),
        num_heads=tuple(kwargs["num_heads"]),
        patch_sizes=(kwargs["patch_size"],) + (2,) * (depth - 1),
        window_size=kwargs["window_size"],
        mlp_ratio=kwargs["mlp_ratio"],
        qkv_bias=kwargs["qkv_bias"],
        drop_path_rate=kwargs["drop_path_rate"],
        hidden_dropout_prob=kwargs["drop_rate"],
        attention_probs_dropout_prob=kwargs["attn_drop_rate"],
        layer_norm_eps=1e-6,
        use_absolute_embeddings=kwargs["ape"],
        patch_norm=kwargs["patch_norm"],
    )


def _vil_kwargs(kwargs: dict) -> dict:
    """`models/vision_longformer.py::MsViT(**kwargs)` as EsViTConfig fields (the `arch` string
    holds one `l<stage>,h<heads>,d<dim>,n<depth>,s<sparse>,g<globals>,p<patch>,f<window>,a<ape>`
    group per stage)."""
    assert kwargs["sharew"] and kwargs["attn_type"] == "longformerhand" and kwargs["sw_exact"] == 0
    assert not kwargs["avg_pool"] and not kwargs["only_glo"]
    stages = [{field[0]: int(field[1:]) for field in stage.split(",")} for stage in kwargs["arch"].split("_")]
    windows = {s["f"] for s in stages}
    absolute = {s["a"] for s in stages}
    assert len(windows) == 1 and len(absolute) == 1, "one window size and one position scheme for all stages"
    return dict(
        backbone_type="vil",
        image_size=kwargs["img_size"],
        hidden_sizes=tuple(s["d"] for s in stages),
        depths=tuple(s["n"] for s in stages),
        num_heads=tuple(s["h"] for s in stages),
        patch_sizes=tuple(s["p"] for s in stages),
        window_size=windows.pop(),
        drop_path_rate=kwargs["drop_path_rate"],
        hidden_dropout_prob=kwargs["drop_rate"],
        layer_norm_eps=kwargs["ln_eps"],
        use_absolute_embeddings=bool(absolute.pop()),
        patch_norm=kwargs["norm_embed"],
        vil_attention_types=tuple("longformer" if s["s"] else "full" for s in stages),
        vil_num_global_tokens=tuple(s["g"] for s in stages),
        vil_mode=kwargs["mode"],
    )


_CVT_SPEC_KEYS = {
    "INIT", "NUM_STAGES", "REL_POS_EMBED", "SHIFT", "DROP_PATH_RATE", "PATCH_SIZE", "PATCH_STRIDE",
    "PATCH_PADDING", "WINDOW_SIZE", "DIM_EMBED", "NUM_HEADS", "DEPTH", "MLP_RATIO", "QKV_BIAS",
    "KERNEL_QKV", "PADDING_QKV",
}  # fmt: skip


def _cvt_kwargs(kwargs: dict) -> dict:
    """`models/cvt_v4_transformer.py::CvT(spec=...)` as EsViTConfig fields (per-stage lists that
    EsViTConfig holds once must agree across stages)."""
    assert kwargs["act_layer"] == "QuickGELU"
    assert kwargs["norm_layer"] == "partial(models.cvt_v4_transformer.LayerNorm, eps=1e-5)"
    spec = kwargs["spec"]
    assert set(spec) <= _CVT_SPEC_KEYS, f"unknown CvT spec keys {set(spec) - _CVT_SPEC_KEYS}"
    assert not spec["REL_POS_EMBED"] and not any(spec["SHIFT"]), "no relative positions, no shifted windows"
    assert len(spec["DEPTH"]) == spec["NUM_STAGES"]

    def single(key: str):
        values = set(spec[key])
        assert len(values) == 1, f"{key}: one value for all stages, got {spec[key]}"
        return values.pop()

    return dict(
        backbone_type="cvt",
        hidden_sizes=tuple(spec["DIM_EMBED"]),
        depths=tuple(spec["DEPTH"]),
        num_heads=tuple(spec["NUM_HEADS"]),
        patch_sizes=tuple(spec["PATCH_SIZE"]),
        patch_strides=tuple(spec["PATCH_STRIDE"]),
        patch_padding=tuple(spec["PATCH_PADDING"]),
        window_size=single("WINDOW_SIZE"),
        mlp_ratio=single("MLP_RATIO"),
        qkv_bias=single("QKV_BIAS"),
        drop_path_rate=spec["DROP_PATH_RATE"],
        layer_norm_eps=1e-5,
        cvt_qkv_kernel_size=single("KERNEL_QKV"),
        cvt_qkv_padding=single("PADDING_QKV"),
    )


_HEAD_FIELDS = dict(
    out_dim="head_out_dim",
    hidden_dim="head_hidden_dim",
    bottleneck_dim="head_bottleneck_dim",
    nlayers="head_num_layers",
    use_bn="head_use_bn",
    norm_last_layer="head_norm_last_layer",
)


def _head_kwargs(heads: dict) -> dict:
    """The manifest's `DINOHead(in_dim, **{...})` calls as EsViTConfig `head_*` fields; the view
    and the region head must agree (one set of head fields builds both)."""

    def arguments(call: str) -> dict:
        match = re.search(r"\*\*(\{.*\})\)\s*$", call)
        assert match, f"cannot read the head arguments of {call!r}"
        return ast.literal_eval(match.group(1))

    view, region = arguments(heads["head"]), arguments(heads["head_dense"])
    assert view == region, f"view head {view} and region head {region} differ"
    assert set(view) == set(_HEAD_FIELDS), f"unexpected head arguments {sorted(view)}"
    return {field: view[arg] for arg, field in _HEAD_FIELDS.items()}
