"""The checkpoint converter: an original-layout `checkpoint.pth` (built from the reference weights,
since the released files are not downloadable here) becomes folders whose models reproduce the
original outputs; a checkpoint of another architecture is refused with a clear error."""

from __future__ import annotations

import argparse

import pytest
import torch
from transformers import AutoModel, AutoModelForPreTraining

import esvit  # noqa: F401  (registers the Auto classes)
from esvit.conversion.original import convert_checkpoint, infer_preset, load_original_checkpoint, main
from tests.reference import load_reference_outputs, load_reference_state_dict, reference_config


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


@pytest.mark.parametrize("name, teacher_prefix", [("swin_tiny_w7", ""), ("cvt_tiny", "module.")])
def test_converted_folders_reproduce_the_original(
    name, teacher_prefix, tmp_path, reference_dir, reference_manifest, reference_inputs
):
    state = load_reference_state_dict(reference_dir, reference_manifest, name)
    path = tmp_path / "checkpoint.pth"
    torch.save(original_checkpoint(state, teacher_prefix, arch="swin_tiny"), path)
    checkpoint = load_original_checkpoint(path)  # weights_only with the Namespace allow-listed
    assert infer_preset(checkpoint) == "swin-tiny-w7"

    model = convert_checkpoint(checkpoint, reference_config(reference_manifest, name), which="teacher")
    out = tmp_path / "converted"
    model.save_pretrained(out / "pretraining")
    model.esvit.save_pretrained(out / "model")

    expected = load_reference_outputs(reference_dir, reference_manifest, name)
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
        convert_checkpoint(load_original_checkpoint(path), reference_config(reference_manifest, "cvt_tiny"))
    with pytest.raises(ValueError, match="no 'teacher' entry"):
        convert_checkpoint({"student": {}}, reference_config(reference_manifest, "swin_tiny_w7"))
