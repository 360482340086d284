"""Print the max abs difference between this implementation and the original EsViT code.

Reads the reference outputs of the original code in `../shared/fixtures/esvit_reference` (or
`$ESVIT_REFERENCE_DIR`, or `--reference_dir`), builds each tiny reference model's config from the
manifest and loads its weights through the checkpoint converter into `EsViTForPreTraining`,
recomputes every stored output (float32, CPU) and prints one row per tensor, plus the end-to-end
EsViT loss of the tiny Swin model. The fixture reading and the configs are those of the tests
(`tests/reference.py`), which assert the same comparisons (`atol=1e-5, rtol=1e-4`); this script
only reports the figures.

    python benchmarks/parity_report.py
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `tests.reference`

from esvit import EsViTForPreTraining  # noqa: E402
from esvit.conversion.original import original_to_pretraining_state_dict  # noqa: E402
from tests.reference import (  # noqa: E402
    REFERENCE_DIR,
    REFERENCE_MODELS,
    load_manifest,
    load_reference_inputs,
    load_reference_outputs,
    load_reference_state_dict,
    reference_config,
    reference_missing,
)


def reference_model(folder: Path, manifest: dict, name: str) -> EsViTForPreTraining:
    """The original tiny model `name` as `EsViTForPreTraining` (eval mode)."""
    config = reference_config(manifest, name)
    model = EsViTForPreTraining(config)
    state = load_reference_state_dict(folder, manifest, name)
    model.load_state_dict(original_to_pretraining_state_dict(state, config))
    return model.eval()


@torch.no_grad()
def model_rows(folder: Path, manifest: dict, inputs: dict, name: str) -> list[tuple[str, str, float]]:
    model = reference_model(folder, manifest, name)
    backbone = model.esvit
    expected = load_reference_outputs(folder, manifest, name)
    g1, l1 = inputs["global_view1"], inputs["local_view1"]
    crops = [inputs[k] for k in ("global_view1", "global_view2", "local_view1", "local_view2")]
    glob, loc, mc = backbone(g1), backbone(l1), model(crops)
    ours = {
        "pooled_global": glob.pooler_output,
        "region_global": glob.last_hidden_state,
        "pooled_local": loc.pooler_output,
        "region_local": loc.last_hidden_state,
        "mc_head_cls": mc.view_logits,
        "mc_head_dense": torch.cat([r.flatten(0, 1) for r in mc.region_logits]),
        "mc_region_fea": torch.cat([r.flatten(0, 1) for r in mc.region_features]),
    }
    for n in (1, 4, 5):
        ours[f"linear_n{n}"] = backbone.get_n_last_blocks_features(g1, n)
    return [(name, key, (ours[key] - expected[key]).abs().max().item()) for key in ours]


@torch.no_grad()
def loss_row(folder: Path, manifest: dict, inputs: dict) -> tuple[float, float]:
    from esvit.training.loss import EsViTLoss

    model = reference_model(folder, manifest, "swin_tiny_w7")
    crops = [inputs[k] for k in ("global_view1", "global_view2", "local_view1", "local_view2")]
    loss = EsViTLoss(out_dim=64)(model(crops), model(crops[:2]), teacher_temp=0.04).loss.item()
    reference = json.loads((folder / "loss_fixture.json").read_text())["end_to_end_swin_tiny_w7"]
    value = reference["loss"] if isinstance(reference, dict) else reference
    return loss, float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference_dir", type=Path, default=REFERENCE_DIR)
    folder = parser.parse_args().reference_dir
    missing = reference_missing(folder)
    if missing is not None:
        parser.error(missing)
    manifest = load_manifest(folder)
    inputs = load_reference_inputs(folder)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, float32, CPU\n")
    print("| model | tensor | max abs diff |\n|---|---|---|")
    for name in REFERENCE_MODELS:
        for model_name, key, diff in model_rows(folder, manifest, inputs, name):
            print(f"| {model_name} | {key} | {diff:.2e} |")
    ours, ref = loss_row(folder, manifest, inputs)
    print(
        f"\nend-to-end EsViT loss (tiny Swin W7, epoch 0): ours {ours:.9f}, original {ref:.9f}, "
        f"relative diff {abs(ours - ref) / abs(ref):.1e}"
    )


if __name__ == "__main__":
    main()
