"""Swin backbone: parity with the original EsViT code, checkpoint key mapping, attention paths.

Parity is measured against the reference outputs of the original `SwinTransformer` (tiny W7 and
W14 models, 224-px and 96-px inputs); the full-size key lists check that every released Swin
architecture converts one-to-one and has the original's parameter count.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tests.reference as parity
from esvit.backbone_swin import SwinEncoder, shift_window_mask, window_merge, window_partition
from esvit.configuration_esvit import PRESETS, EsViTConfig
from esvit.conversion.swin import is_derived_buffer, original_swin_to_esvit
from tests.reference import (
    FEATURES,
    load_reference_outputs,
    load_reference_state_dict,
    reference_config,
    split_heads,
    tiny_config,
)

SWIN_TINY_REFERENCES = ("swin_tiny_w7", "swin_tiny_w14")
# Every released (or configured) full-size Swin; the micro presets are ours (tests, small images).
SWIN_PRESETS = sorted(n for n, p in PRESETS.items() if p["backbone_type"] == "swin" and "micro" not in n)
ATOL, RTOL = parity.PARITY_ATOL, parity.PARITY_RTOL


def reference_encoder_weights(reference_dir: Path, manifest: dict, name: str) -> dict[str, torch.Tensor]:
    """Original backbone weights converted to EsViTModel keys (`encoder.*`)."""
    backbone, _ = split_heads(load_reference_state_dict(reference_dir, manifest, name))
    return original_swin_to_esvit(backbone)


# ------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", SWIN_TINY_REFERENCES)
def test_encoder_matches_original(name, reference_dir, reference_manifest, reference_inputs):
    entry = reference_manifest["models"][name]
    config = reference_config(reference_manifest, name, heads=False)
    assert tuple(entry["depths_for_n_last_blocks"]) == config.depths
    encoder = SwinEncoder(config).eval()
    encoder.load_state_dict(
        parity.strip_encoder_prefix(reference_encoder_weights(reference_dir, reference_manifest, name))
    )
    expected = load_reference_outputs(reference_dir, reference_manifest, name)
    for impl in ("sdpa", "eager"):
        got = parity.encoder_features(encoder, reference_inputs, impl)
        parity.assert_matches_reference(f"{name} encoder {impl}", got, {k: expected[k] for k in FEATURES})


@pytest.mark.parametrize("name", SWIN_TINY_REFERENCES)
def test_model_matches_original(name, reference_dir, reference_manifest, reference_inputs):
    from esvit.modeling_esvit import EsViTModel

    model = EsViTModel(reference_config(reference_manifest, name, heads=False)).eval()
    weights = reference_encoder_weights(reference_dir, reference_manifest, name)
    model.encoder.load_state_dict(parity.strip_encoder_prefix(weights))
    expected = load_reference_outputs(reference_dir, reference_manifest, name)
    glob_view, local_view = reference_inputs["global_view1"], reference_inputs["local_view1"]
    with torch.no_grad():
        glob, local = model(glob_view), model(local_view)
        got = {
            "pooled_global": glob.pooler_output,
            "region_global": glob.last_hidden_state,
            "pooled_local": local.pooler_output,
            "region_local": local.last_hidden_state,
        }
        got.update({f"linear_n{n}": model.get_n_last_blocks_features(glob_view, n) for n in (1, 4, 5)})
    parity.assert_matches_reference(f"{name} EsViTModel", got, {k: expected[k] for k in FEATURES})


def test_model_state_dict_loads_strictly_from_converted_checkpoint(reference_dir, reference_manifest):
    from esvit.modeling_esvit import EsViTModel

    name = "swin_tiny_w7"
    model = EsViTModel(reference_config(reference_manifest, name, heads=False))
    model.load_state_dict(reference_encoder_weights(reference_dir, reference_manifest, name), strict=True)


def test_window_geometry_is_pinned_at_training_size():
    def geometry(config):
        return [(b.window_size, b.shift_size) for stage in SwinEncoder(config).layers for b in stage.blocks]

    # 224 px: stage resolutions 56, 28, 14, 7. A stage that fits one window never shifts.
    assert geometry(tiny_config("swin", window_size=7)) == [(7, 0), (7, 3)] * 3 + [(7, 0), (7, 0)]
    assert geometry(tiny_config("swin", window_size=14)) == [(14, 0), (14, 7)] * 2 + [(14, 0), (14, 0), (7, 0), (7, 0)]


# ------------------------------------------------------------------------- full-size presets
@pytest.mark.parametrize("preset", SWIN_PRESETS)
def test_preset_matches_original_keys_and_parameter_count(preset, reference_dir):
    keys = json.loads((reference_dir / "full_size_keys" / f"{preset.replace('-', '_')}.json").read_text())
    config = EsViTConfig.from_preset(preset)
    assert [config.image_size] * 2 == keys["train_image_size"]
    with torch.device("meta"):
        encoder = SwinEncoder(config)
    num_params = sum(p.numel() for p in encoder.parameters())
    assert num_params == keys["backbone_num_params"], f"{preset}: {num_params} != {keys['backbone_num_params']}"

    original_shapes = keys["backbone_state_dict"]["shapes"]
    original = {k: torch.empty(shape, device="meta") for k, shape in original_shapes.items()}
    converted = original_swin_to_esvit(original)
    derived = [k for k in original if is_derived_buffer(k)]
    assert set(derived) == set(keys["backbone_state_dict"]["buffers"])
    assert len(converted) + len(derived) == len(original)  # nothing collapsed onto one key

    ours = {f"encoder.{k}": tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert set(converted) == set(ours)
    mismatched = {k: (tuple(v.shape), ours[k]) for k, v in converted.items() if tuple(v.shape) != ours[k]}
    assert not mismatched, f"{preset}: shape mismatches {mismatched}"


def test_issue_parameter_counts():
    expected_millions = {
        "swin-tiny-w7": 27.52,
        "swin-small-w7": 48.84,
        "swin-base-w7": 86.74,
        "swin-tiny-w14": 27.57,
        "swin-small-w14": 48.97,
        "swin-base-w14": 86.92,
    }
    for preset, millions in expected_millions.items():
        with torch.device("meta"):
            encoder = SwinEncoder(EsViTConfig.from_preset(preset))
        assert round(sum(p.numel() for p in encoder.parameters()) / 1e6, 2) == millions, preset


# ------------------------------------------------------------------------------- converter
def test_converter_rejects_heads_prefixes_and_unknown_keys():
    weight = torch.zeros(1)
    good = {"norm.weight": weight, "layers.0.blocks.1.attn.relative_position_index": weight}
    assert list(original_swin_to_esvit(good)) == ["encoder.norm.weight"]
    with pytest.raises(ValueError, match="head keys"):
        original_swin_to_esvit({**good, "head_dense.mlp.0.weight": weight})
    with pytest.raises(ValueError, match="strip 'module.'"):
        original_swin_to_esvit({"module.norm.weight": weight})
    with pytest.raises(ValueError, match="layers.0.blocks.0.attn.rel_pos"):
        original_swin_to_esvit({**good, "layers.0.blocks.0.attn.rel_pos": weight})


# ------------------------------------------------------------------------ attention paths
@pytest.fixture(scope="module")
def random_encoder() -> SwinEncoder:
    torch.manual_seed(0)
    encoder = SwinEncoder(tiny_config("swin"))
    with torch.no_grad():  # non-trivial norms and biases so every parameter matters
        for name, p in encoder.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return encoder.eval()


@pytest.mark.parametrize("size", [(224, 224), (96, 96), (100, 100), (112, 80)])
def test_sdpa_matches_eager(random_encoder, size):
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sdpa = random_encoder(pixels, output_hidden_states=True, output_block_features=True)
        eager = random_encoder(
            pixels, output_hidden_states=True, output_block_features=True, attn_implementation="eager"
        )
    assert sdpa.attentions is None
    torch.testing.assert_close(sdpa.last_hidden_state, eager.last_hidden_state, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(sdpa.pooler_output, eager.pooler_output, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(sdpa.block_features, eager.block_features, atol=ATOL, rtol=RTOL)
    # Odd maps are padded by patch merging: 100 px -> 25, 13, 7, 4 tokens per side.
    h, w = size[0] // 4, size[1] // 4
    shapes = []
    for _ in range(4):
        shapes.append((h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    assert sdpa.stage_spatial_shapes == tuple(shapes)
    assert [s.shape[1] for s in sdpa.stage_outputs] == [a * b for a, b in shapes]
    assert sdpa.last_hidden_state.shape == (2, shapes[-1][0] * shapes[-1][1], 64)


def test_eager_returns_attention_probabilities(random_encoder):
    with torch.no_grad():
        out = random_encoder(torch.randn(1, 3, 96, 96), output_attentions=True)
    assert len(out.attentions) == 8
    # 96 px, W7: stage maps 24, 12, 6, 3 are padded to 28, 14, 7, 7 -> 16, 4, 1, 1 windows.
    windows = [16, 16, 4, 4, 1, 1, 1, 1]
    heads = [1, 1, 2, 2, 2, 2, 4, 4]
    for probs, n_windows, n_heads in zip(out.attentions, windows, heads):
        assert probs.shape == (n_windows, n_heads, 49, 49)
        torch.testing.assert_close(probs.sum(-1), torch.ones(n_windows, n_heads, 49))


def test_gradient_checkpointing_gives_same_gradients():
    from esvit.modeling_esvit import EsViTModel

    torch.manual_seed(0)
    model = EsViTModel(tiny_config("swin")).train()
    pixels = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    target = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(3))
    calls = []
    for stage in model.encoder.layers:
        for block in stage.blocks:
            block.attn.register_forward_hook(lambda *_: calls.append(1))

    def gradients() -> tuple[dict[str, torch.Tensor], int]:
        model.zero_grad()
        calls.clear()
        (model(pixels).last_hidden_state * target).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = gradients()
    model.activation_checkpointing_enable()
    assert all(b.gradient_checkpointing for s in model.encoder.layers for b in s.blocks)
    checkpointed, checkpointed_calls = gradients()
    assert checkpointed_calls == 2 * plain_calls == 16  # every block ran again in backward
    assert all(g.abs().sum() > 0 for g in plain.values())
    torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)


def test_relative_position_bias_gets_the_same_gradient_through_sdpa(random_encoder):
    pixels = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(4))
    target = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(5))
    grads = {}
    for impl in ("sdpa", "eager"):
        random_encoder.zero_grad()
        (random_encoder(pixels, attn_implementation=impl).last_hidden_state * target).sum().backward()
        grads[impl] = {n: p.grad.clone() for n, p in random_encoder.named_parameters() if "bias_table" in n}
    random_encoder.zero_grad()
    torch.testing.assert_close(grads["sdpa"], grads["eager"], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------- masks
def test_shift_masks_are_cached_per_padded_size(random_encoder):
    shifted = [b for s in random_encoder.layers for b in s.blocks if b.shift_size > 0]
    unshifted = [b for s in random_encoder.layers for b in s.blocks if b.shift_size == 0]
    assert len(shifted) == 3  # stage 4 of W7 never shifts
    for block in shifted:
        block.shift_mask_cache.clear()
    with torch.no_grad():
        random_encoder(torch.randn(1, 3, 96, 96))
        first = [dict(b.shift_mask_cache) for b in shifted]
        random_encoder(torch.randn(2, 3, 96, 96))
    for block, before in zip(shifted, first):
        assert len(block.shift_mask_cache) == 1
        ((key, mask),) = block.shift_mask_cache.items()
        assert before[key] is mask  # reused, not rebuilt
    assert [k[:2] for b in shifted for k in b.shift_mask_cache] == [(28, 28), (14, 14), (7, 7)]
    with torch.no_grad():
        random_encoder(torch.randn(1, 3, 224, 224))
    assert [len(b.shift_mask_cache) for b in shifted] == [2, 2, 2]
    assert all(not b.shift_mask_cache for b in unshifted)


@pytest.mark.parametrize("height,width,window,shift", [(28, 28, 7, 3), (7, 7, 7, 3), (14, 28, 14, 7)])
def test_shift_mask_matches_region_construction(height, width, window, shift):
    # Independent construction: label the nine strips of the shifted map, then compare labels.
    labels = torch.zeros(height, width)
    strips_h = (slice(0, height - window), slice(height - window, height - shift), slice(height - shift, height))
    strips_w = (slice(0, width - window), slice(width - window, width - shift), slice(width - shift, width))
    for i, rows in enumerate(strips_h):
        for j, cols in enumerate(strips_w):
            labels[rows, cols] = 3 * i + j
    windows = window_partition(labels[None, :, :, None], window)[0, :, :, 0]  # [nW, N]
    expected = (windows[:, None, :] != windows[:, :, None]).float() * -100.0
    torch.testing.assert_close(shift_window_mask(height, width, window, shift), expected, atol=0, rtol=0)


def test_window_partition_round_trip():
    x = torch.randn(2, 14, 21, 5)
    windows = window_partition(x, 7)
    assert windows.shape == (2, 6, 49, 5)
    torch.testing.assert_close(windows[0, 1].view(7, 7, 5), x[0, :7, 7:14])  # row-major window order
    torch.testing.assert_close(window_merge(windows, 7, 14, 21), x, atol=0, rtol=0)


# ------------------------------------------------------------------------ position embedding
def test_absolute_position_embedding():
    config = tiny_config("swin", use_absolute_embeddings=True)
    torch.manual_seed(0)
    encoder = SwinEncoder(config).eval()
    assert encoder.absolute_pos_embed.shape == (1, 56 * 56, 8)
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        with_ape = encoder(pixels, output_hidden_states=True).embedding_output
        encoder.absolute_pos_embed.zero_()
        without = encoder(pixels, output_hidden_states=True).embedding_output
        encoder.absolute_pos_embed.fill_(0.5)
        shifted = encoder(pixels, output_hidden_states=True).embedding_output
        assert encoder(torch.randn(1, 3, 96, 96)).last_hidden_state.shape == (1, 9, 64)  # resized, not rejected
    assert not torch.allclose(with_ape, without)
    torch.testing.assert_close(shifted, without + 0.5)
    with pytest.raises(ValueError, match=r"pixel_values must be \[batch, 3, height, width\]"):
        encoder(torch.randn(1, 1, 96, 96))


# ------------------------------------------------------------------------------- save/load
def test_save_and_reload_rebuilds_derived_buffers(tmp_path):
    from esvit.modeling_esvit import EsViTModel

    torch.manual_seed(0)
    model = EsViTModel(tiny_config("swin")).eval()
    model.save_pretrained(tmp_path)
    reloaded = EsViTModel.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(model.named_buffers(), reloaded.named_buffers()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    pixels = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).last_hidden_state, model(pixels).last_hidden_state)


def test_compiled_backbone_compiles_once_per_resolution():
    """The lazily filled shift-mask cache must not force a recompile on the second step."""
    from esvit.modeling_esvit import EsViTModel

    torch._dynamo.reset()
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    model = EsViTModel(tiny_config("swin", image_size=64, window_size=4)).eval()
    compiled = torch.compile(model, backend=counting_backend, dynamic=False)
    with torch.no_grad():
        for _ in range(3):  # three steps, two crop resolutions each
            for size in (64, 32):
                compiled(torch.randn(2, 3, size, size))
    assert len(graphs) == 2, f"{len(graphs)} graphs compiled for 2 resolutions"
    torch._dynamo.reset()
