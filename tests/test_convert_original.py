"""The checkpoint converter: an original-layout `checkpoint.pth` (built from the reference weights,
since the released files are not downloadable here) becomes folders whose models reproduce the
original outputs; a checkpoint of another architecture is refused with a clear error."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import load_reference_state_dict
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForPreTraining

import esvit  # noqa: F401  (registers the Auto classes)
from esvit import EsViTConfig
from esvit.conversion.original import convert_checkpoint, infer_preset, load_original_checkpoint, main

TINY_SWIN = dict(
    backbone_type="swin",
    hidden_sizes=(8, 16, 32, 64),
    depths=(2, 2, 2, 2),
    num_heads=(1, 2, 2, 4),
    window_size=7,
    drop_path_rate=0.0,
    head_out_dim=64,
    head_hidden_dim=64,
    head_bottleneck_dim=32,
    head_norm_last_layer=False,
)
TINY_CVT = dict(
    TINY_SWIN,
    backbone_type="cvt",
    depths=(1, 2, 2, 2),
    patch_sizes=(7, 3, 3, 3),
    patch_strides=(4, 2, 2, 2),
    patch_padding=(2, 1, 1, 1),
    layer_norm_eps=1e-5,
)


def original_checkpoint(state: dict, teacher_prefix: str, arch: str) -> dict:
    """A dict laid out like the original `checkpoint.pth` (student under DDP, teacher maybe not)."""
    return {
        "student": {f"module.{k}": v.clone() for k, v in state.items()},
        "teacher": {f"{teacher_prefix}{k}": v.clone() for k, v in state.items()},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 300,
        "args": argparse.Namespace(arch=arch, cfg="experiments/imagenet/swin/swin_tiny_patch4_window7_224.yaml"),
        "dino_loss": {"center": torch.zeros(1, 64), "center_grid": torch.zeros(1, 64)},
        "fp16_scaler": None,
    }


@pytest.mark.parametrize(
    "name, kwargs, teacher_prefix", [("swin_tiny_w7", TINY_SWIN, ""), ("cvt_tiny", TINY_CVT, "module.")]
)
def test_converted_folders_reproduce_the_original(
    name, kwargs, teacher_prefix, tmp_path, reference_dir, reference_manifest, reference_inputs
):
    state = load_reference_state_dict(reference_dir, reference_manifest, name)
    path = tmp_path / "checkpoint.pth"
    torch.save(original_checkpoint(state, teacher_prefix, arch="swin_tiny"), path)
    checkpoint = load_original_checkpoint(path)  # weights_only with the Namespace allow-listed
    assert infer_preset(checkpoint) == "swin-tiny-w7"

    model = convert_checkpoint(checkpoint, EsViTConfig(**kwargs), which="teacher")
    out = tmp_path / "converted"
    model.save_pretrained(out / "pretraining")
    model.esvit.save_pretrained(out / "model")

    expected = load_file(reference_dir / f"{name}.outputs.safetensors")
    backbone = AutoModel.from_pretrained(out / "model").eval()
    got = backbone(reference_inputs["global_view1"])
    torch.testing.assert_close(got.pooler_output, expected["pooled_global"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.last_hidden_state, expected["region_global"], atol=1e-5, rtol=1e-4)

    pretraining = AutoModelForPreTraining.from_pretrained(out / "pretraining").eval()
    crops = [reference_inputs[k] for k in ("global_view1", "global_view2", "local_view1", "local_view2")]
    with torch.no_grad():
        mc = pretraining(crops)
    torch.testing.assert_close(mc.view_logits, expected["mc_head_cls"], atol=1e-5, rtol=1e-4)
    dense = torch.cat([r.flatten(0, 1) for r in mc.region_logits])
    torch.testing.assert_close(dense, expected["mc_head_dense"], atol=1e-5, rtol=1e-4)


def test_cli_and_wrong_architecture(tmp_path, reference_dir, reference_manifest):
    state = load_reference_state_dict(reference_dir, reference_manifest, "swin_tiny_w7")
    path = tmp_path / "checkpoint.pth"
    torch.save(original_checkpoint(state, "", arch="swin_tiny"), path)
    # the released swin-tiny preset has other widths: the converter must refuse, naming the problem
    with pytest.raises(ValueError, match="checkpoint does not match"):
        main([str(path), str(tmp_path / "out"), "--preset", "swin-tiny-w7"])
    with pytest.raises(ValueError, match="not a key of an original CvT"):
        convert_checkpoint(load_original_checkpoint(path), EsViTConfig(**TINY_CVT))
    with pytest.raises(ValueError, match="no 'teacher' entry"):
        convert_checkpoint({"student": {}}, EsViTConfig(**TINY_SWIN))
