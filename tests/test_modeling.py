"""EsViTConfig / EsViTModel / EsViTBackbone / EsViTForPreTraining behaviour common to all families:
config round trip and validation, save -> load, the Auto classes, `trust_remote_code` loading in a
fresh interpreter without the package, the feature-extraction pipeline, SDPA vs eager, gradient
checkpointing and the multi-crop forward."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoBackbone, AutoConfig, AutoImageProcessor, AutoModel, AutoModelForPreTraining

import esvit
from esvit import EsViTBackbone, EsViTConfig, EsViTForPreTraining, EsViTModel
from tests import reference
from tests.reference import FAMILIES

# Shallower than the reference models, smaller heads, and ViL in its default mode (0, not 1).
DEPTHS = (1, 2, 1, 1)
HEADS = dict(head_hidden_dim=32, head_bottleneck_dim=16, head_out_dim=64)
FAMILY_OVERRIDES = {"swin": {}, "vil": dict(vil_mode=0), "cvt": {}}


def tiny_config(family: str, **overrides) -> EsViTConfig:
    return reference.tiny_config(family, **{"depths": DEPTHS, **FAMILY_OVERRIDES[family], **HEADS, **overrides})


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every float tensor off its init value so that no parameter or statistic is trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            tensor.add_(0.05 * torch.randn(tensor.shape, generator=gen))
            if tensor.ndim == 1 and tensor.numel() > 0:
                tensor.abs_()  # keeps BatchNorm variances positive
    return model.eval()


def images(batch: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------- config
def test_config_round_trip(tmp_path):
    config = EsViTConfig.from_preset("swin-small-w14", out_features=["stage2", "stage4"])
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, EsViTConfig)
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert strip(loaded.to_dict()) == strip(config.to_dict())
    assert loaded.depths == (2, 2, 18, 2) and loaded.window_size == 14
    assert loaded.hidden_size == 768 and loaded.num_hidden_layers == 24
    assert loaded.out_features == ["stage2", "stage4"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(backbone_type="resnet"), "backbone_type must be one of"),
        (dict(num_heads=(5, 6, 12, 24)), "not divisible by its 5 attention heads"),
        (dict(depths=(2, 0, 6, 2)), "every entry of depths must be positive"),
        (dict(depths=(2, 2, 6)), "give one per stage"),
        (dict(hidden_sizes=(96, 180, 384, 768)), "Swin doubles its width"),
        (dict(drop_path_rate=1.5), "drop_path_rate must lie in"),
        (dict(n_last_blocks=13), "n_last_blocks must lie in"),
        (dict(backbone_type="vil", vil_attention_types=("longformer", "dense", "full", "full")), "vil_attention_types"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(Exception, match=message):
        EsViTConfig(**overrides)


def test_config_rejects_wrong_type():
    with pytest.raises(Exception):  # noqa: B017  (huggingface_hub's StrictDataclassFieldValidationError)
        EsViTConfig(depths="2,2,6,2")
    with pytest.raises(Exception):  # noqa: B017
        EsViTConfig(window_size=7.5)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="swin-tiny-w7"):
        EsViTConfig.from_preset("swin-huge")


# ----------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, tmp_path):
    """from_pretrained builds on the meta device: derived buffers must be rebuilt, weights exact."""
    model = perturbed(EsViTModel(tiny_config(family)))
    pixels = images()
    expected = model(pixels, output_hidden_states=True)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is EsViTModel
    got = loaded(pixels, output_hidden_states=True)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=0, atol=0)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=0, atol=0)
    for a, b in zip(got.feature_maps, expected.feature_maps):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the local-crop resolution exercises the padded / resampled paths after reload too
    torch.testing.assert_close(loaded(images(size=96)).pooler_output, model(images(size=96)).pooler_output)


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_shapes(family):
    config = tiny_config(family)
    model = EsViTModel(config).eval()
    out = model(images(), output_hidden_states=True)
    assert out.pooler_output.shape == (2, 64)
    assert out.last_hidden_state.shape == (2, 49, 64)
    assert len(out.hidden_states) == 5 and len(out.feature_maps) == 4
    assert [f.shape[1] for f in out.feature_maps] == list(config.hidden_sizes)
    assert out.feature_maps[-1].shape[-2:] == (7, 7)
    assert model.get_n_last_blocks_features(images(), n=4).shape == (2, config.n_last_blocks_dim(4))
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(torch.randn(2, 1, 224, 224))


def test_loading_wrong_architecture_is_an_error(tmp_path):
    EsViTModel(tiny_config("swin")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not fit this cvt EsViT configuration"):
        EsViTModel.from_pretrained(tmp_path, config=tiny_config("cvt"))


# -------------------------------------------------------------------------------- auto machinery
def test_auto_classes_after_import(tmp_path):
    config = tiny_config("swin")
    assert type(AutoModel.from_config(config)) is EsViTModel
    pretraining = perturbed(EsViTForPreTraining(config))
    pretraining.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "esvit"
    assert saved["auto_map"]["AutoModel"] == "modeling_esvit.EsViTModel"
    for name in ("configuration_esvit.py", "modeling_esvit.py", "layers.py", "heads.py", "backbone_swin.py"):
        assert (tmp_path / name).is_file(), name
    reloaded = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    crops = [images(), images(seed=1), images(size=96, seed=2)]
    a, b = pretraining(crops), reloaded(crops)
    torch.testing.assert_close(a.view_logits, b.view_logits, rtol=0, atol=0)
    # a pretraining folder also loads as the plain backbone (heads dropped on purpose)
    backbone = AutoModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(backbone(crops[0]).pooler_output, a.pooler_output[:2], rtol=0, atol=0)


def test_auto_backbone_feature_maps():
    config = tiny_config("swin", out_features=["stem", "stage2", "stage4"])
    backbone = AutoBackbone.from_config(config).eval()
    assert type(backbone) is EsViTBackbone
    assert backbone.channels == [8, 16, 64]
    maps = backbone(images()).feature_maps
    assert [tuple(m.shape) for m in maps] == [(2, 8, 56, 56), (2, 16, 28, 28), (2, 64, 7, 7)]


def test_image_processor_is_the_eval_transform(tmp_path):
    EsViTModel(tiny_config("swin")).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    from PIL import Image

    out = processor(Image.new("L", (300, 400), color=128), return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 224, 224)
    expected = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(out["pixel_values"][0, :, 100, 100], expected, rtol=1e-4, atol=1e-4)


#: The flat modules `save_pretrained` copies for `trust_remote_code` (the README's "ships to the Hub").
HUB_FILES = (
    "configuration_esvit.py", "modeling_esvit.py", "backbone_swin.py", "backbone_vil.py", "backbone_cvt.py",
    "heads.py", "layers.py",
)  # fmt: skip


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    sys.modules["esvit"] = None  # the package must not be importable: everything comes from the folder
    try:
        import esvit  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("esvit is importable; the test would prove nothing")
    import torch
    from transformers import AutoModel, pipeline
    folder, inputs, outputs = sys.argv[1:4]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert "esvit" not in type(model).__module__.split(".")[0], type(model).__module__
    pixels = torch.load(inputs)
    out = model(pixels)
    extractor = pipeline("image-feature-extraction", model=folder, trust_remote_code=True)
    from PIL import Image
    feats = extractor(Image.new("RGB", (256, 256), (200, 30, 60)), return_tensors=True, pool=True)
    torch.save({"pooled": out.pooler_output, "region": out.last_hidden_state,
                "pipeline": feats, "module": type(model).__module__}, outputs)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_trust_remote_code_in_fresh_process(family, tmp_path):
    model = perturbed(EsViTModel(tiny_config(family)))
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    # exactly the Hub-facing flat modules travel: no training, evaluation or conversion code
    assert sorted(p.name for p in folder.glob("*.py")) == sorted(HUB_FILES)
    pixels = images()
    torch.save(pixels, tmp_path / "inputs.pt")
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "PYTHONPATH": "",
    }
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["module"].startswith("transformers_modules"), out["module"]
    expected = model(pixels)
    torch.testing.assert_close(out["pooled"], expected.pooler_output, rtol=0, atol=0)
    torch.testing.assert_close(out["region"], expected.last_hidden_state, rtol=0, atol=0)
    # the pipeline pools with the model's pooler: same as the installed model on the processed image
    processor = AutoImageProcessor.from_pretrained(folder)
    from PIL import Image

    pixels = processor(Image.new("RGB", (256, 256), (200, 30, 60)), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(out["pipeline"].reshape(-1), model(pixels).pooler_output.reshape(-1))


# ------------------------------------------------------------------------- attention / checkpointing
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [224, 96])
def test_sdpa_and_eager_agree(family, size):
    model = perturbed(EsViTModel(tiny_config(family)))
    pixels = images(size=size)
    sdpa = model(pixels)
    eager = model(pixels, output_attentions=True)
    torch.testing.assert_close(eager.pooler_output, sdpa.pooler_output, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eager.last_hidden_state, sdpa.last_hidden_state, rtol=1e-4, atol=1e-5)
    assert eager.attentions is not None and len(eager.attentions) == model.config.num_blocks
    model.set_attn_implementation("eager")
    torch.testing.assert_close(model(pixels).pooler_output, sdpa.pooler_output, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_same_gradients(family):
    torch.manual_seed(0)
    model = perturbed(EsViTModel(tiny_config(family))).train()
    pixels = images()

    def grads():
        model.zero_grad()
        out = model(pixels)
        (out.pooler_output.square().sum() + out.last_hidden_state.mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    # transformers >= 5.2x names it activation checkpointing; older 5.x releases gradient checkpointing
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------ multi-crop
def test_multicrop_forward_groups_resolutions():
    model = perturbed(EsViTForPreTraining(tiny_config("swin")))
    crops = [images(seed=0), images(seed=1), images(size=96, seed=2), images(size=96, seed=3)]
    calls = []
    hook = model.esvit.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    out = model(crops)
    hook.remove()
    assert calls == [4, 4]  # one backbone call per resolution
    assert out.view_logits.shape == (8, 64)
    assert [tuple(r.shape) for r in out.region_logits] == [(2, 49, 64)] * 2 + [(2, 9, 64)] * 2
    assert [tuple(r.shape) for r in out.region_features] == [(2, 49, 64)] * 2 + [(2, 9, 64)] * 2
    single = model(crops[2])
    torch.testing.assert_close(single.view_logits, out.view_logits[4:6], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(single.region_logits[0], out.region_logits[2], rtol=1e-5, atol=1e-6)


def test_norm_last_layer_freezes_the_scale():
    frozen = EsViTForPreTraining(tiny_config("swin", head_norm_last_layer=True))
    free = EsViTForPreTraining(tiny_config("swin", head_norm_last_layer=False))
    assert not frozen.head.last_layer.weight_g.requires_grad
    assert free.head.last_layer.weight_g.requires_grad


def test_package_exports():
    assert esvit.EsViTModel is EsViTModel
    assert "swin-tiny-w7" in esvit.PRESETS


@pytest.mark.parametrize(
    "preset, dim",
    [
        ("swin-tiny-w7", 2304),
        ("swin-small-w7", 2304),
        ("swin-tiny-w14", 2304),
        ("swin-base-w7", 3072),
        ("swin-base-w14", 3072),
        ("vil-2262", 2304),
        ("cvt-s1", 2304),
    ],
)
def test_n_last_blocks_feature_dimension(preset, dim):
    """The linear-probe feature width of each released model (n = 4), from a real forward pass."""
    config = EsViTConfig.from_preset(preset)
    assert config.n_last_blocks_dim(4) == dim
    with torch.device("meta"):
        model = EsViTModel(config)
    # the meta device gives the true output shapes without allocating the full-size weights
    assert model.get_n_last_blocks_features(torch.empty(1, 3, 224, 224, device="meta"), n=4).shape == (1, dim)
