"""Print the max abs difference between this implementation and the original EsViT code.

Reads the reference outputs of the original code in `../shared/fixtures/esvit_reference` (or
`--reference_dir`), loads each tiny reference model's weights through the checkpoint converter into
`EsViTForPreTraining`, recomputes every stored output (float32, CPU) and prints one row per tensor,
plus the end-to-end EsViT loss of the tiny Swin model. The tests assert the same comparisons
(`atol=1e-5, rtol=1e-4`); this script only reports the figures.

    python benchmarks/parity_report.py
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from safetensors.torch import load_file

from esvit import EsViTConfig, EsViTForPreTraining
from esvit.conversion.original import original_to_pretraining_state_dict

HEADS = dict(head_out_dim=64, head_hidden_dim=64, head_bottleneck_dim=32, head_norm_last_layer=False)
TINY = dict(hidden_sizes=(8, 16, 32, 64), num_heads=(1, 2, 2, 4), drop_path_rate=0.0, **HEADS)
CONFIGS = {
    "swin_tiny_w7": dict(TINY, backbone_type="swin", depths=(2, 2, 2, 2), window_size=7),
    "swin_tiny_w14": dict(TINY, backbone_type="swin", depths=(2, 2, 2, 2), window_size=14),
    "vil_tiny": dict(
        TINY,
        backbone_type="vil",
        depths=(1, 2, 2, 2),
        vil_attention_types=("longformer", "longformer", "full", "full"),
        vil_num_global_tokens=(1, 1, 1, 0),
        vil_mode=1,
    ),
    "cvt_tiny": dict(
        TINY,
        backbone_type="cvt",
        depths=(1, 2, 2, 2),
        patch_sizes=(7, 3, 3, 3),
        patch_strides=(4, 2, 2, 2),
        patch_padding=(2, 1, 1, 1),
        layer_norm_eps=1e-5,
    ),
}


def reference_state(folder: Path, manifest: dict, name: str) -> dict:
    state = load_file(folder / f"{name}.weights.safetensors")
    index_file = folder / f"{name}.index_buffers.safetensors"
    if index_file.is_file():
        buffers = load_file(index_file)
        for key, entry in manifest["models"][name].get("index_buffer_map", {}).items():
            state[key] = buffers[entry].long()
    return state


@torch.no_grad()
def model_rows(folder: Path, manifest: dict, inputs: dict, name: str) -> list[tuple[str, str, float]]:
    config = EsViTConfig(**CONFIGS[name])
    model = EsViTForPreTraining(config)
    model.load_state_dict(original_to_pretraining_state_dict(reference_state(folder, manifest, name), config))
    model.eval()
    backbone = model.esvit
    expected = load_file(folder / f"{name}.outputs.safetensors")
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

    config = EsViTConfig(**CONFIGS["swin_tiny_w7"])
    model = EsViTForPreTraining(config)
    model.load_state_dict(original_to_pretraining_state_dict(reference_state(folder, manifest, "swin_tiny_w7"), config))
    model.eval()
    crops = [inputs[k] for k in ("global_view1", "global_view2", "local_view1", "local_view2")]
    loss = EsViTLoss(out_dim=64)(model(crops), model(crops[:2]), teacher_temp=0.04).loss.item()
    reference = json.loads((folder / "loss_fixture.json").read_text())["end_to_end_swin_tiny_w7"]
    value = reference["loss"] if isinstance(reference, dict) else reference
    return loss, float(value)


def main() -> None:
    default = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "esvit_reference"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference_dir", type=Path, default=default)
    folder = parser.parse_args().reference_dir
    manifest = json.loads((folder / "manifest.json").read_text())
    inputs = {k: v.float() for k, v in load_file(folder / "inputs.safetensors").items()}
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, float32, CPU\n")
    print("| model | tensor | max abs diff |\n|---|---|---|")
    for name in CONFIGS:
        for model_name, key, diff in model_rows(folder, manifest, inputs, name):
            print(f"| {model_name} | {key} | {diff:.2e} |")
    ours, ref = loss_row(folder, manifest, inputs)
    print(
        f"\nend-to-end EsViT loss (tiny Swin W7, epoch 0): ours {ours:.9f}, original {ref:.9f}, "
        f"relative diff {abs(ours - ref) / abs(ref):.1e}"
    )


if __name__ == "__main__":
    main()
