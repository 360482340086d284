"""What every backbone family does with wrong or unusual inputs.

All three encoders start their forward with the same check (`esvit.layers.prepare_encoder_inputs`),
so they accept and refuse the same inputs with the same messages: a wrong rank or channel count,
an empty batch and an image smaller than the model's total stride are `ValueError`s; integer
pixels are a `TypeError` that points to the image processor; floating-point input of another
dtype is cast to the model's dtype (left alone under autocast).
"""

from __future__ import annotations

import pytest
import torch

from esvit import EsViTBackbone, EsViTConfig, EsViTForPreTraining, EsViTModel
from tests.reference import FAMILIES, tiny_config

# The shared tiny backbones with one block per stage, 64-px images (32 px minimum) and tiny heads.
SMALL_HEADS = dict(head_hidden_dim=32, head_bottleneck_dim=16, head_out_dim=32)


def tiny(family: str, **overrides) -> EsViTConfig:
    return tiny_config(family, depths=(1, 1, 1, 1), image_size=64, vil_mode=0, **SMALL_HEADS, **overrides)


FAMILY_NAMES = {"swin": "Swin", "vil": "ViL", "cvt": "CvT"}
_MODELS: dict[str, EsViTModel] = {}


def tiny_model(family: str) -> EsViTModel:
    """One eval-mode model per family, shared by the tests (none of them changes it)."""
    if family not in _MODELS:
        torch.manual_seed(0)
        _MODELS[family] = EsViTModel(tiny(family)).eval()
    return _MODELS[family]


def images(batch: int = 2, size: int = 64, width: int | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(size)
    return torch.randn(batch, 3, size, size if width is None else width, generator=generator)


# ------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(3, 64, 64), (1, 1, 3, 64, 64), (2, 1, 64, 64), (2, 4, 64, 64), (2, 64, 64, 3)])
def test_wrong_rank_or_channels(family, shape):
    with pytest.raises(ValueError, match=r"pixel_values must be \[batch, 3, height, width\], got shape"):
        tiny_model(family)(torch.zeros(shape))


@pytest.mark.parametrize("family", FAMILIES)
def test_not_a_tensor(family):
    with pytest.raises(TypeError, match="pixel_values must be a torch.Tensor, got list"):
        tiny_model(family)(images().tolist())


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_batch(family):
    with pytest.raises(ValueError, match=r"pixel_values is an empty batch \(shape \(0, 3, 64, 64\)\)"):
        tiny_model(family)(images(batch=0))


def test_empty_batch_through_every_model_class():
    config = tiny("cvt")  # CvT used to return an empty output here
    for model in (EsViTBackbone(config), EsViTForPreTraining(config)):
        with pytest.raises(ValueError, match="empty batch"):
            model(images(batch=0))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [(7, 7), (31, 31), (64, 31), (31, 64), (1, 1)])
def test_too_small(family, size):
    model = tiny_model(family)
    assert model.config.min_input_size == 32
    message = (
        rf"pixel_values of {size[0]}x{size[1]} px are too small for this {FAMILY_NAMES[family]} model: "
        r"height and width must be at least 32 px"
    )
    with pytest.raises(ValueError, match=message):
        model(images(size=size[0], width=size[1]))


@pytest.mark.parametrize("family", FAMILIES)
def test_smallest_input_gives_one_region(family):
    with torch.no_grad():
        out = tiny_model(family)(images(size=32))
    assert out.last_hidden_state.shape == (2, 1, 64)


def test_minimum_follows_the_geometry():
    # CvT without padding loses pixels at every stage: 63 px is the least that leaves one token.
    config = tiny("cvt", patch_padding=(0, 0, 0, 0))
    assert config.min_input_size == 63
    model = EsViTModel(config).eval()
    with torch.no_grad():
        assert model(images(size=63)).last_hidden_state.shape == (2, 1, 64)
    with pytest.raises(ValueError, match="at least 63 px"):
        model(images(size=62))


# ------------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_floating_input_is_cast_to_the_model_dtype(family, dtype):
    model = tiny_model(family)
    pixels = images().to(dtype)
    with torch.no_grad():
        got = model(pixels)
        expected = model(pixels.float())
    assert got.pooler_output.dtype == torch.float32
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_input_is_refused(family, dtype):
    pixels = torch.zeros(2, 3, 64, 64, dtype=dtype)
    with pytest.raises(TypeError, match=rf"pixel_values has dtype {dtype}.*image processor.*normalise"):
        tiny_model(family)(pixels)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_model_takes_float32_input(family):
    model = EsViTModel(tiny(family)).eval().to(torch.bfloat16)
    with torch.no_grad():
        out = model(images())
    assert out.pooler_output.dtype == torch.bfloat16
    assert torch.isfinite(out.pooler_output.float()).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_autocast_keeps_working(family, dtype):
    model = tiny_model(family)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images().to(dtype))
    assert out.pooler_output.shape == (2, 64)
    assert torch.isfinite(out.pooler_output.float()).all()


# -------------------------------------------------------------------------- attention choice
@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_attn_implementation_is_refused_by_every_encoder(family):
    with pytest.raises(ValueError, match="attn_implementation must be 'sdpa' or 'eager', got 'flash'"):
        tiny_model(family).encoder(images(), attn_implementation="flash")


@pytest.mark.parametrize("family", FAMILIES)
def test_output_attentions_forces_eager(family):
    with torch.no_grad():
        out = tiny_model(family).encoder(images(), output_attentions=True, attn_implementation="sdpa")
    assert out.attentions is not None and len(out.attentions) == 4
    assert all(a is not None for a in out.attentions)
