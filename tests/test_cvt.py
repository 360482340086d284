"""CvT-v4 backbone: parity with the original code, released sizes, checkpoint keys, save/load."""

from __future__ import annotations

import json

import pytest
import torch

import tests.reference as parity
from esvit.backbone_cvt import CvtEncoder
from esvit.configuration_esvit import EsViTConfig
from esvit.conversion.cvt import original_cvt_to_esvit
from esvit.modeling_esvit import EsViTModel
from tests.reference import (
    REFERENCE_HEAD_SIZES,
    load_reference_outputs,
    load_reference_state_dict,
    reference_config,
    split_heads,
    tiny_config,
)

ATOL, RTOL = parity.PARITY_ATOL, parity.PARITY_RTOL
ENCODER_PREFIX = "encoder."


def original_backbone_state(reference_dir, manifest) -> dict[str, torch.Tensor]:
    backbone, _ = split_heads(load_reference_state_dict(reference_dir, manifest, "cvt_tiny"))
    return backbone


@pytest.fixture(scope="module")
def reference_outputs(reference_dir, reference_manifest) -> dict[str, torch.Tensor]:
    return load_reference_outputs(reference_dir, reference_manifest, "cvt_tiny")


def check_against_reference(name: str, actual: torch.Tensor, expected: torch.Tensor, tag: str) -> None:
    print(f"[{tag}] {name}: max abs diff {(actual - expected).abs().max().item():.3e}")
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_encoder_matches_original(
    reference_dir, reference_manifest, reference_inputs, reference_outputs, attn_implementation
):
    encoder = CvtEncoder(tiny_config("cvt", **REFERENCE_HEAD_SIZES)).eval()
    converted = original_cvt_to_esvit(original_backbone_state(reference_dir, reference_manifest))
    encoder.load_state_dict(parity.strip_encoder_prefix(converted), strict=True)

    got = parity.encoder_features(encoder, reference_inputs, attn_implementation)
    assert got["region_global"].shape == (2, 49, 64) and got["region_local"].shape == (2, 9, 64)
    assert got["linear_n5"].shape == (2, 2 * 64 + 2 * 32 + 16)  # the last 5 of the 1-2-2-2 blocks
    parity.assert_matches_reference(
        f"cvt_tiny encoder/{attn_implementation}", got, {k: reference_outputs[k] for k in got}
    )


def test_model_matches_original(reference_dir, reference_manifest, reference_inputs, reference_outputs):
    model = EsViTModel(tiny_config("cvt", **REFERENCE_HEAD_SIZES)).eval()
    converted = original_cvt_to_esvit(original_backbone_state(reference_dir, reference_manifest))
    model.load_state_dict(converted, strict=True)

    with torch.no_grad():
        for view, suffix in (("global_view1", "global"), ("local_view1", "local")):
            out = model(reference_inputs[view])
            check_against_reference(
                f"pooled_{suffix}", out.pooler_output, reference_outputs[f"pooled_{suffix}"], "model"
            )
            check_against_reference(
                f"region_{suffix}", out.last_hidden_state, reference_outputs[f"region_{suffix}"], "model"
            )
        for n in (1, 4, 5):
            features = model.get_n_last_blocks_features(reference_inputs["global_view1"], n)
            check_against_reference(f"linear_n{n}", features, reference_outputs[f"linear_n{n}"], "model")


# ----------------------------------------------------------------------- released sizes/keys
@pytest.mark.parametrize(("preset", "key_file"), [("cvt-s1", "cvt_s1.json"), ("cvt-s3", "cvt_s3.json")])
def test_presets_match_original_sizes_and_keys(reference_dir, preset, key_file):
    reference = json.loads((reference_dir / "full_size_keys" / key_file).read_text())
    with torch.device("meta"):
        encoder = CvtEncoder(EsViTConfig.from_preset(preset))

    assert sum(p.numel() for p in encoder.parameters()) == reference["backbone_num_params"]

    original_shapes = reference["backbone_state_dict"]["shapes"]
    int_keys = reference["backbone_state_dict"]["non_float32"]
    original = {
        key: torch.empty(shape, dtype=torch.int64 if key in int_keys else torch.float32, device="meta")
        for key, shape in original_shapes.items()
    }
    converted = original_cvt_to_esvit(original)
    ours = {ENCODER_PREFIX + k: v for k, v in encoder.state_dict().items()}
    assert len(converted) == len(original)  # one-to-one
    assert set(converted) == set(ours)
    for key, tensor in converted.items():
        assert tuple(tensor.shape) == tuple(ours[key].shape), key
        assert tensor.dtype == ours[key].dtype, key


def test_converter_rejects_foreign_keys():
    weight = torch.zeros(8)
    for key, match in (
        ("head.mlp.0.weight", "head"),
        ("head_dense.last_layer.weight_g", "head"),
        ("module.norm.weight", "module."),
        ("stage0.1.layers.0.0.fn.rel_pos_bias_table", "relative-position"),
        ("stage0.0.stem.0.weight", "ResNet stem"),
        ("stage0.1.layers.0.2.weight", "not a key"),
    ):
        with pytest.raises(ValueError, match=match):
            original_cvt_to_esvit({key: weight})


# ----------------------------------------------------------------------- attention paths
def random_input(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))


@pytest.mark.parametrize("size", [224, 96, 80])
def test_sdpa_matches_eager(size):
    torch.manual_seed(0)
    encoder = CvtEncoder(tiny_config("cvt", **REFERENCE_HEAD_SIZES)).eval()
    pixels = random_input(size)
    with torch.no_grad():
        sdpa = encoder(pixels, output_block_features=True)
        eager = encoder(pixels, output_block_features=True, output_attentions=True)
    torch.testing.assert_close(sdpa.last_hidden_state, eager.last_hidden_state, atol=1e-5, rtol=1e-4)
    for a, b in zip(sdpa.block_features, eager.block_features):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert sdpa.attentions is None
    assert len(eager.attentions) == 7
    for probs in eager.attentions:
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))


def test_window_shapes_at_96_px():
    # Stages of 24, 12, 6, 3 tokens: windows of 7 (24 padded to 28), 7 (12 -> 14), 6 and 3.
    encoder = CvtEncoder(tiny_config("cvt", **REFERENCE_HEAD_SIZES)).eval()
    with torch.no_grad():
        out = encoder(random_input(96), output_attentions=True, output_hidden_states=True)
    assert out.stage_spatial_shapes == ((24, 24), (12, 12), (6, 6), (3, 3))
    expected = [(2 * 16, 1, 49, 49)] + [(2 * 4, 2, 49, 49)] * 2 + [(2, 2, 36, 36)] * 2 + [(2, 4, 9, 9)] * 2
    assert [tuple(a.shape) for a in out.attentions] == expected
    assert out.embedding_output.shape == (2, 24 * 24, 8)
    assert [tuple(s.shape) for s in out.stage_outputs] == [(2, 576, 8), (2, 144, 16), (2, 36, 32), (2, 9, 64)]


def test_rejects_unsupported_settings():
    # the configuration refuses them before any module is built
    with pytest.raises(Exception, match="cvt_qkv_padding"):
        tiny_config("cvt", **REFERENCE_HEAD_SIZES, cvt_qkv_padding=0)
    with pytest.raises(Exception, match="absolute position"):
        tiny_config("cvt", **REFERENCE_HEAD_SIZES, use_absolute_embeddings=True)
    with pytest.raises(ValueError, match="pixel_values"):
        CvtEncoder(tiny_config("cvt", **REFERENCE_HEAD_SIZES))(torch.zeros(1, 1, 64, 64))


# ------------------------------------------------------------------- training-mode behaviour
def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    pixels = random_input(96)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = EsViTModel(tiny_config("cvt", **REFERENCE_HEAD_SIZES))
        if checkpointing:
            model.activation_checkpointing_enable()
            blocks = [b for stage in model.encoder.stages for b in stage.blocks]
            assert all(block.gradient_checkpointing for block in blocks)
        model.train()
        model(pixels).pooler_output.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_save_load_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = EsViTModel(tiny_config("cvt", **REFERENCE_HEAD_SIZES))
    model.train()
    with torch.no_grad():  # moves the BatchNorm running statistics away from their init
        model(random_input(96))
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = EsViTModel.from_pretrained(tmp_path).eval()

    saved_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert set(saved_state) == set(loaded_state)
    bn_stats = [k for k in saved_state if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert bn_stats and all(saved_state[k].ne(0).any() for k in bn_stats if "running_mean" in k)
    for key, tensor in saved_state.items():
        torch.testing.assert_close(loaded_state[key], tensor, atol=0, rtol=0, msg=key)
    pixels = random_input(224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).pooler_output, model(pixels).pooler_output, atol=0, rtol=0)


def test_pretraining_heads_match_original(reference_dir, reference_manifest, reference_inputs, reference_outputs):
    from esvit.modeling_esvit import EsViTForPreTraining

    state = load_reference_state_dict(reference_dir, reference_manifest, "cvt_tiny")
    backbone, heads = split_heads(state)
    converted = {f"esvit.{k}": v for k, v in original_cvt_to_esvit(backbone).items()}
    converted.update(heads)
    model = EsViTForPreTraining(reference_config(reference_manifest, "cvt_tiny")).eval()
    model.load_state_dict(converted, strict=True)

    crops = [reference_inputs[k] for k in ("global_view1", "global_view2", "local_view1", "local_view2")]
    with torch.no_grad():
        out = model(crops)

    def flat(per_crop: tuple[torch.Tensor, ...]) -> torch.Tensor:  # [B, L_c, K] per crop -> crop-major rows
        return torch.cat([part.flatten(0, 1) for part in per_crop])

    check_against_reference("mc_head_cls", out.view_logits, reference_outputs["mc_head_cls"], "pretraining")
    check_against_reference("mc_head_dense", flat(out.region_logits), reference_outputs["mc_head_dense"], "pretraining")
    check_against_reference(
        "mc_region_fea", flat(out.region_features), reference_outputs["mc_region_fea"], "pretraining"
    )
