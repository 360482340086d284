"""`EsViTConfig` refuses what cannot build a sensible model, at construction time.

Types are checked by `@strict` when a field is set; values by the `validate_*` methods; sizes are
bounded so that a typo fails at once instead of hanging or exhausting memory; a misspelled field
name is refused with the nearest valid one, while every key transformers itself writes into or
passes to a config is still accepted. Also here: `from_pretrained` refuses weights that disagree
with config.json (missing, unexpected, reshaped), and the stage geometry each encoder is built for.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from transformers import AutoConfig

from esvit import EsViTBackbone, EsViTConfig, EsViTForPreTraining, EsViTModel
from esvit.backbone_swin import SwinEncoder
from esvit.configuration_esvit import PRESETS
from tests.reference import tiny_config

SMALL_HEADS = dict(head_hidden_dim=32, head_bottleneck_dim=16, head_out_dim=32)


def small(family: str = "swin", **overrides) -> EsViTConfig:
    """The shared tiny backbone of `family` with depths 1-1-2-1 and tiny heads."""
    return tiny_config(family, **{"depths": (1, 1, 2, 1), "vil_mode": 0, **SMALL_HEADS, **overrides})


# ------------------------------------------------------------------------------------- types
@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(layer_norm_eps="x"), "layer_norm_eps"),
        (dict(depths="abc"), "depths"),
        (dict(depths=(1, 1, "a", 1)), "depths"),
        (dict(depths=(1, 1, 2.0, 1)), "depths"),
        (dict(window_size=7.5), "window_size"),
        (dict(image_size="224"), "image_size"),
        (dict(qkv_bias="yes"), "qkv_bias"),
        (dict(num_heads=(True, 2, 2, 4)), "num_heads"),
        (dict(mlp_ratio=None), "mlp_ratio"),
        (dict(backbone_type=3), "backbone_type"),
    ],
)
def test_types_are_checked_at_config_time(overrides, field):
    with pytest.raises(Exception, match=rf"field '{field}'"):
        small(**overrides)


def test_ints_are_accepted_for_float_fields():
    config = small(mlp_ratio=2, drop_path_rate=0, initializer_range=1)
    assert config.mlp_ratio == 2 and config.initializer_range == 1


# ------------------------------------------------------------------------------------ bounds
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(depths=(1, 1, 10**6, 1)), r"every entry of depths must be at most 100"),
        (dict(depths=(40, 40, 20, 1)), r"depths \(40, 40, 20, 1\) add up to 101 blocks; at most 100"),
        (dict(depths=(1,) * 9, hidden_sizes=(8,) * 9, num_heads=(1,) * 9, patch_sizes=(1,) * 9), "between 1 and 8"),
        (dict(depths=()), "between 1 and 8 stages, got 0"),
        (dict(hidden_sizes=(8192, 16384, 32768, 65536), num_heads=(8, 8, 8, 8)), "hidden_sizes must be at most 4096"),
        (dict(num_heads=(1, 2, 2, 256), hidden_sizes=(256, 512, 1024, 2048)), "num_heads must be at most 128"),
        (dict(patch_sizes=(64, 2, 2, 2)), "patch_sizes must be at most 32"),
        (dict(image_size=10**6), r"image_size must lie in \[1, 2048\], got 1000000"),
        (dict(image_size=16), "image_size 16 is too small for this swin configuration: it must be at least 32 px"),
        (dict(window_size=1000), r"window_size must lie in \[1, 32\]"),
        (dict(window_size=0), r"window_size must lie in \[1, 32\]"),
        (dict(num_channels=0), r"num_channels must lie in \[1, 1024\]"),
        (dict(head_out_dim=10**7), r"head_out_dim must lie in \[1, 262144\]"),
        (dict(head_hidden_dim=10**6), r"head_hidden_dim must lie in \[1, 16384\]"),
        (dict(head_bottleneck_dim=0), r"head_bottleneck_dim must lie in \[1, 16384\]"),
        (dict(head_num_layers=100), r"head_num_layers must lie in \[1, 8\]"),
        (dict(n_last_blocks=6), r"n_last_blocks must lie in \[1, 5\]"),
        (dict(mlp_ratio=1000.0), r"mlp_ratio must lie in \(0, 16\]"),
        (dict(layer_norm_eps=0.0), r"layer_norm_eps must lie in \(0, 1\)"),
        (dict(attention_probs_dropout_prob=1.0), r"attention_probs_dropout_prob must lie in \[0, 1\)"),
        (
            dict(hidden_sizes=(512, 1024, 2048, 4096), num_heads=(8, 16, 32, 64), depths=(2, 2, 60, 2), mlp_ratio=16),
            r"about 10\.4 billion parameters \(backbone and heads\), more than the 2 billion allowed",
        ),
    ],
)
def test_sizes_are_bounded(overrides, message):
    start = time.perf_counter()
    with pytest.raises(Exception, match=message):
        small(**overrides)
    assert time.perf_counter() - start < 1.0  # refused before anything is built


@pytest.mark.parametrize(
    "family, overrides, message",
    [
        ("vil", dict(image_size=2048), r"ViL stage 3 uses 'full' attention over 128x128 tokens at image_size 2048"),
        ("vil", dict(vil_num_global_tokens=(1, 1, 100, 0)), r"vil_num_global_tokens entries must lie in \[0, 16\]"),
        ("vil", dict(vil_mode=-1), "vil_mode must be >= 0"),
        ("cvt", dict(cvt_qkv_kernel_size=99, cvt_qkv_padding=49), r"odd \(at most 15\)"),
        ("cvt", dict(cvt_qkv_padding=0), "cvt_qkv_padding"),
        ("cvt", dict(patch_padding=(7, 1, 1, 1)), "stage 1: CvT's patch embedding needs"),
        ("cvt", dict(patch_strides=(0, 2, 2, 2)), "stage 1: CvT's patch embedding needs"),
        ("cvt", dict(patch_strides=(4, 2, 2)), "patch_strides has 3 entries but depths has 4 stages"),
    ],
)
def test_family_specific_checks(family, overrides, message):
    with pytest.raises(Exception, match=message):
        small(family, **overrides)


def test_every_preset_is_within_bounds():
    for name in PRESETS:
        config = EsViTConfig.from_preset(name)
        if name.endswith("-p2"):  # the small-image presets: three stages of 2-px patches at 28 px
            assert config.min_input_size == 8 and config.stage_resolutions() == (14, 7, 4), name
            continue
        assert config.min_input_size == 32, name
        assert config.stage_resolutions() == (56, 28, 14, 7), name
        assert config.stage_resolutions(96) == (24, 12, 6, 3), name
    assert 0.2e9 < EsViTConfig.from_preset("swin-large-w7").approx_num_parameters() < 0.3e9


# ------------------------------------------------------------------------------- field names
@pytest.mark.parametrize(
    "name, suggestion",
    [
        ("vil_num_global_token", "vil_num_global_tokens"),
        ("window", "window_size"),
        ("hidden_size", "hidden_sizes"),
        ("layer_norm_epsilon", "layer_norm_eps"),
        ("qkv_biass", "qkv_bias"),
    ],
)
def test_misspelled_field_names_the_nearest(name, suggestion):
    message = f"unknown EsViTConfig field '{name}'; did you mean '{suggestion}'?"
    with pytest.raises(ValueError) as err:
        EsViTConfig(**{name: 1})
    assert str(err.value) == message
    with pytest.raises(ValueError, match=message.replace("?", r"\?")):
        EsViTConfig.from_preset("swin-micro", **{name: 1})
    with pytest.raises(ValueError, match=message.replace("?", r"\?")):
        EsViTConfig.check_field_names(["depths", name])


def test_unrelated_name_lists_the_fields():
    with pytest.raises(ValueError, match=r"unknown EsViTConfig field 'zzzz'; the fields are: .*backbone_type.*depths"):
        EsViTConfig.check_field_names({"zzzz": 1})  # a mapping: its keys are checked


def test_check_field_names_accepts_fields_and_transformers_keys():
    EsViTConfig.check_field_names([])
    EsViTConfig.check_field_names(["depths", "vil_num_global_tokens", "image_size", "_out_features"])
    EsViTConfig.check_field_names(["transformers_version", "architectures", "auto_map", "out_features"])
    EsViTConfig.check_field_names(["out_indices", "stage_names", "torch_dtype", "dtype", "id2label", "label2id"])
    EsViTConfig.check_field_names(["num_labels", "attn_implementation", "output_attentions", "return_dict"])
    with pytest.raises(TypeError, match="field names are strings"):
        EsViTConfig.check_field_names([3])


def test_keys_transformers_passes_are_accepted():
    config = small(
        "swin",
        transformers_version="5.0.0",
        architectures=["EsViTModel"],
        auto_map={"AutoConfig": "configuration_esvit.EsViTConfig"},
        model_type="esvit",
        out_features=["stage2", "stage4"],
        out_indices=[2, 4],
        stage_names=["stem", "stage1", "stage2", "stage3", "stage4"],
        torch_dtype="float32",
        attn_implementation="eager",
        id2label={"0": "a", "1": "b"},
        label2id={"a": 0, "b": 1},
        name_or_path="somewhere",
        _commit_hash="abc",
        _name_or_path="somewhere",
        use_cache=False,  # a generation parameter, dropped by transformers
        torchscript=False,  # a transformers 4.x key
    )
    assert config.out_features == ["stage2", "stage4"] and config.auto_map["AutoConfig"]
    assert config.dtype == torch.float32 and config._attn_implementation == "eager"
    assert EsViTConfig(**config.to_dict()).to_dict() == config.to_dict()


def test_every_preset_round_trips_through_save_and_auto_config(tmp_path):
    for name in PRESETS:
        config = EsViTConfig.from_preset(name, out_features=["stage1", "stage3"])
        folder = tmp_path / name
        config.save_pretrained(folder)
        for loaded in (EsViTConfig.from_pretrained(folder), AutoConfig.from_pretrained(folder)):
            assert isinstance(loaded, EsViTConfig)
            assert loaded.to_diff_dict() == config.to_diff_dict(), name
        last = f"stage{config.num_stages}"
        assert AutoConfig.from_pretrained(folder, out_features=[last]).out_indices == [config.num_stages]


# ------------------------------------------------------------------------ weights vs config
def _save_then_edit(model, folder, **config_changes) -> None:
    model.save_pretrained(folder)
    path = folder / "config.json"
    saved = json.loads(path.read_text())
    saved.update(config_changes)
    path.write_text(json.dumps(saved))


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(depths=[1, 1, 1, 1]), "encoder.layers.2.blocks.1."),  # 13 weights of a block too many
        (dict(patch_norm=False), "encoder.patch_embed.norm."),
        (dict(qkv_bias=False), "attn.qkv.bias"),
    ],
)
def test_unexpected_backbone_weights_are_an_error(tmp_path, change, key):
    _save_then_edit(EsViTModel(small()), tmp_path, **change)
    with pytest.raises(
        ValueError, match="does not fit this swin EsViT configuration: the config and the weights disagree"
    ) as err:
        EsViTModel.from_pretrained(tmp_path)
    assert "0 backbone weights missing" in str(err.value) and " unexpected (e.g. [" in str(err.value)
    assert key in str(err.value)


def test_missing_backbone_weights_are_an_error(tmp_path):
    _save_then_edit(EsViTModel(small(depths=(1, 1, 1, 1))), tmp_path, depths=[1, 1, 2, 1])
    with pytest.raises(ValueError, match=r"13 backbone weights missing \(e.g. \['encoder.layers.2.blocks.1."):
        EsViTModel.from_pretrained(tmp_path)


def test_heads_may_be_added_or_dropped(tmp_path):
    torch.manual_seed(0)
    config = small()
    pretraining = EsViTForPreTraining(config).eval()
    pretraining.save_pretrained(tmp_path / "pretraining")
    EsViTModel(config).save_pretrained(tmp_path / "model")
    pixels = torch.randn(1, 3, 64, 64)
    # heads in the folder, none in the model: dropped
    model = EsViTModel.from_pretrained(tmp_path / "pretraining").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).last_hidden_state, pretraining.esvit(pixels).last_hidden_state)
    assert isinstance(EsViTBackbone.from_pretrained(tmp_path / "pretraining"), EsViTBackbone)
    model, info = EsViTForPreTraining.from_pretrained(tmp_path / "model", output_loading_info=True)
    assert info["missing_keys"] and all(k.startswith(("head.", "head_dense.")) for k in info["missing_keys"])


# ----------------------------------------------------------------------------- stage geometry
@pytest.mark.parametrize(
    "overrides, resolutions, windows",
    [
        # 28 px, 2x2 patches, 3 stages: merging pads 7 -> 8, so stage 3 gets 4x4 tokens and a 4x4 window
        (
            dict(image_size=28, hidden_sizes=(8, 16, 32), depths=(2, 2, 2), num_heads=(1, 2, 4), patch_sizes=(2, 2, 2)),
            (14, 7, 4),
            [(7, 0), (7, 3), (7, 0), (7, 0), (4, 0), (4, 0)],
        ),
        # 100 px: 25 -> 13 -> 7 -> 4 (rounding down built 12, 6, 3 and mis-sized windows)
        (dict(image_size=100, depths=(1, 2, 2, 1)), (25, 13, 7, 4), [(7, 0), (7, 0), (7, 3), (7, 0), (7, 0), (4, 0)]),
        # 60 px: 15 -> 8 -> 4 -> 2
        (dict(image_size=60, depths=(1, 2, 1, 1)), (15, 8, 4, 2), [(7, 0), (7, 0), (7, 3), (4, 0), (2, 0)]),
        # 224 px (the released geometry) is unchanged
        (dict(image_size=224, depths=(1, 1, 2, 1)), (56, 28, 14, 7), [(7, 0), (7, 0), (7, 0), (7, 3), (7, 0)]),
    ],
)
def test_swin_stages_are_built_for_the_maps_they_get(overrides, resolutions, windows):
    config = small("swin", **overrides)
    encoder = SwinEncoder(config).eval()
    assert encoder.stage_resolutions == resolutions == config.stage_resolutions()
    assert [(b.window_size, b.shift_size) for stage in encoder.layers for b in stage.blocks] == windows
    size = config.image_size
    with torch.no_grad():
        out = encoder(torch.randn(1, 3, size, size), output_hidden_states=True)
    assert out.stage_spatial_shapes == tuple((r, r) for r in resolutions)


@pytest.mark.parametrize("family", ["swin", "vil", "cvt"])
@pytest.mark.parametrize("size", [64, 100, 72])
def test_config_geometry_matches_every_encoder(family, size):
    config = small(family, image_size=size)
    model = EsViTModel(config).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size), output_hidden_states=True)
    assert tuple(f.shape[-1] for f in out.feature_maps) == config.stage_resolutions()
