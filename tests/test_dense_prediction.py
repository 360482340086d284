"""An EsViT backbone inside a transformers dense-prediction model, as the README shows it.

`AutoBackbone.from_pretrained(local_folder)` cannot be used on transformers 5.x: its
`_BaseAutoBackboneClass.from_pretrained` asks the Hub `repo_exists(path)` before anything else, and
a local path is not a valid repo id (`HFValidationError`), for every model type (its own Swin
folders included). The README therefore loads folders with `EsViTBackbone.from_pretrained`; this
test pins both facts, so the README changes when upstream does.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoBackbone, UperNetConfig, UperNetForSemanticSegmentation

from esvit import EsViTBackbone, EsViTConfig, EsViTModel

STAGES = ["stage1", "stage2", "stage3", "stage4"]


@pytest.fixture()
def saved_backbone(tmp_path):
    torch.manual_seed(0)
    model = EsViTModel(EsViTConfig.from_preset("swin-micro", image_size=64, window_size=4))
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model", model


def test_backbone_from_a_saved_folder(saved_backbone):
    folder, model = saved_backbone
    backbone = EsViTBackbone.from_pretrained(folder, out_features=["stage2", "stage4"]).eval()  # the README line
    maps = backbone(torch.randn(1, 3, 64, 64)).feature_maps
    assert backbone.out_features == ["stage2", "stage4"] and [m.shape[1] for m in maps] == [32, 128]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(backbone.state_dict()[name], value, rtol=0, atol=0)


def test_auto_backbone_still_checks_the_hub_for_local_folders(saved_backbone):
    folder, _ = saved_backbone
    try:
        AutoBackbone.from_pretrained(str(folder), out_features=["stage2"])
    except Exception as err:  # the upstream cause documented in the README
        assert "repo" in str(err).lower() or "timm" in str(err).lower(), err
    else:
        pytest.fail("AutoBackbone.from_pretrained now loads local folders: document it in the README")


def test_upernet_on_an_esvit_backbone_trains_saves_and_reloads(saved_backbone, tmp_path):
    folder, _ = saved_backbone
    backbone = EsViTBackbone.from_pretrained(folder, out_features=STAGES)
    config = UperNetConfig(
        backbone_config=backbone.config, num_labels=3, hidden_size=32, auxiliary_in_channels=64, auxiliary_channels=16
    )
    model = UperNetForSemanticSegmentation(config)
    model.backbone.load_state_dict(backbone.state_dict())
    pixels, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    out = model(pixel_values=pixels, labels=labels)
    assert out.logits.shape == (2, 3, 64, 64) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.backbone.encoder.patch_embed.proj.weight.grad.abs().sum() > 0

    model.eval().save_pretrained(tmp_path / "upernet")
    reloaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path / "upernet").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)
