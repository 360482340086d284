"""Convert checkpoints of the original EsViT code (github microsoft/esvit) into Hub-ready folders.

A released `checkpoint.pth` is a dict `{'student', 'teacher', 'optimizer', 'epoch', 'args',
'dino_loss', 'fp16_scaler'}`. The networks' heads are attributes of the backbone (`head.*`,
`head_dense.*`); student keys carry DistributedDataParallel's `module.` prefix, teacher keys carry it
only for models with BatchNorm (CvT). `args` is a pickled `argparse.Namespace`, so the file is read
with `torch.load(weights_only=True)` and an allow-list of exactly that class: no arbitrary objects
are ever unpickled.

Usage (the console script `esvit-convert` is `python -m esvit.conversion.original`):
    esvit-convert checkpoint.pth out/esvit-swin-tiny-w7 --preset swin-tiny-w7
    # writes out/.../model (EsViTModel) and out/.../pretraining (EsViTForPreTraining, with heads
    # and, when the checkpoint has them, the loss centres)

The family-specific key maps are pure functions in `conversion.swin`, `conversion.vil`,
`conversion.cvt`.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..configuration_esvit import EsViTConfig
from ..modeling_esvit import EsViTForPreTraining
from ..training.loss import LOSS_STATE_FILE
from .cvt import original_cvt_to_esvit
from .swin import original_swin_to_esvit
from .vil import original_vil_to_esvit

BACKBONE_CONVERTERS: dict[str, Callable[[dict], dict]] = {
    "swin": original_swin_to_esvit,
    "vil": original_vil_to_esvit,
    "cvt": original_cvt_to_esvit,
}
HEAD_PREFIXES = ("head.", "head_dense.")

#: Buffer names of the original checkpoint's `dino_loss` entry -> those of `EsViTLoss`.
ORIGINAL_BUFFER_NAMES = {"center": "view_center", "center_grid": "region_center"}

#: `--arch` values of the original training script and the preset each one builds.
ARCH_TO_PRESET = {
    "swin_tiny": "swin-tiny-w7",
    "swin_small": "swin-small-w7",
    "swin_base": "swin-base-w7",
    "swin_large": "swin-large-w7",
    "vil_2262": "vil-2262",
    "cvt_tiny": "cvt-s1",
}


def load_original_checkpoint(path: str | Path) -> dict:
    """Read a `checkpoint.pth` of the original code without unpickling arbitrary objects."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def split_network_state(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """Strip DDP's `module.` prefix and separate backbone keys from head keys."""
    backbone, heads = {}, {}
    for key, value in state.items():
        key = key[len("module.") :] if key.startswith("module.") else key
        (heads if key.startswith(HEAD_PREFIXES) else backbone)[key] = value
    return backbone, heads


def original_to_pretraining_state_dict(state: Mapping[str, torch.Tensor], config: EsViTConfig) -> dict:
    """Map one original network (student or teacher) onto `EsViTForPreTraining` keys."""
    backbone, heads = split_network_state(state)
    converted = {f"esvit.{k}": v for k, v in BACKBONE_CONVERTERS[config.backbone_type](backbone).items()}
    for key, value in heads.items():
        # DINOHead keeps the original's layout (mlp.<i>, last_layer.weight_g / weight_v).
        converted[key] = value
    return converted


def infer_preset(checkpoint: Mapping) -> str | None:
    """The preset named by the checkpoint's training arguments, when they say it unambiguously."""
    args = checkpoint.get("args")
    arch = getattr(args, "arch", None)
    preset = ARCH_TO_PRESET.get(arch)
    cfg = str(getattr(args, "cfg", "") or "")
    if preset and preset.startswith("swin") and re.search(r"window14", cfg):
        preset = preset.replace("-w7", "-w14")
    return preset


def convert_checkpoint(
    checkpoint: Mapping,
    config: EsViTConfig,
    which: str = "teacher",
) -> EsViTForPreTraining:
    """Build an `EsViTForPreTraining` holding the chosen network of an original checkpoint.

    Raises a ValueError naming the offending keys when the checkpoint does not match `config`
    (an unknown or missing key, or a tensor of another shape): nothing is loaded partially.
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}.")
    if which not in checkpoint:
        raise ValueError(f"the checkpoint has no {which!r} entry; its keys are {sorted(checkpoint)}.")
    head_shape = checkpoint[which].get(
        "head.last_layer.weight_v", checkpoint[which].get("module.head.last_layer.weight_v")
    )
    if head_shape is not None and tuple(head_shape.shape) != (config.head_out_dim, config.head_bottleneck_dim):
        raise ValueError(
            f"the checkpoint's head maps {head_shape.shape[1]} -> {head_shape.shape[0]} but the config "
            f"expects {config.head_bottleneck_dim} -> {config.head_out_dim}; set head_out_dim/head_bottleneck_dim."
        )
    state = original_to_pretraining_state_dict(checkpoint[which], config)
    model = EsViTForPreTraining(config)
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    wrong = sorted(k for k in set(ours) & set(state) if ours[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"checkpoint does not match the {config.backbone_type} config: "
            f"missing {missing[:8]}, unexpected {unexpected[:8]}, wrong shape {wrong[:8]}"
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


def convert_original_loss_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the original checkpoint's `dino_loss` entry (`center`, `center_grid`) to ours.

    DINO-only checkpoints carry just `center`; the region centre then starts at zero.
    """
    unknown = set(state) - set(ORIGINAL_BUFFER_NAMES)
    if unknown:
        raise KeyError(f"unexpected keys in the original loss state: {sorted(unknown)}")
    converted = {ORIGINAL_BUFFER_NAMES[k]: v for k, v in state.items()}
    if "region_center" not in converted and "view_center" in converted:
        converted["region_center"] = torch.zeros_like(converted["view_center"])
    return converted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="original checkpoint.pth")
    parser.add_argument("output_dir", help="folder to write model/ and pretraining/ into")
    parser.add_argument("--preset", help="EsViT preset (default: inferred from the checkpoint's args)")
    parser.add_argument("--which", default="teacher", choices=("teacher", "student"))
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id", help="Hub repository for --push_to_hub")
    args = parser.parse_args(argv)

    checkpoint = load_original_checkpoint(args.checkpoint)
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get(args.which), Mapping):
        keys = sorted(checkpoint)[:8] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        parser.error(
            f"{args.checkpoint} is not a checkpoint of the original training script: it has no {args.which!r} "
            f"network (its top-level keys: {keys}). A plain state dict is not supported; the script writes "
            "{'student', 'teacher', 'optimizer', 'epoch', 'args', 'dino_loss', ...}."
        )
    preset = args.preset or infer_preset(checkpoint)
    if preset is None:
        parser.error("cannot infer the architecture from the checkpoint; pass --preset")
    config = EsViTConfig.from_preset(preset, drop_path_rate=0.0)
    weight_v = checkpoint[args.which].get(
        "head.last_layer.weight_v", checkpoint[args.which].get("module.head.last_layer.weight_v")
    )
    if weight_v is not None:
        config.head_out_dim, config.head_bottleneck_dim = (int(s) for s in weight_v.shape)
    model = convert_checkpoint(checkpoint, config, args.which)
    out = Path(args.output_dir)
    model.save_pretrained(out / "pretraining")
    model.esvit.save_pretrained(out / "model")
    if isinstance(checkpoint.get("dino_loss"), Mapping):
        from safetensors.torch import save_file

        centres = convert_original_loss_state_dict(dict(checkpoint["dino_loss"]))
        save_file({k: v.contiguous() for k, v in centres.items()}, str(out / "pretraining" / LOSS_STATE_FILE))
    print(f"wrote {out / 'model'} (EsViTModel) and {out / 'pretraining'} (EsViTForPreTraining), preset {preset}")
    if args.push_to_hub:
        if not args.hub_model_id:
            parser.error("--push_to_hub needs --hub_model_id")
        model.esvit.push_to_hub(args.hub_model_id)


if __name__ == "__main__":
    main()
