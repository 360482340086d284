"""The arguments of `run_linear_probe.py`: model, data and protocol dataclasses and their parsing.

Only the standard library (and `esvit.images`' constants) at module level, so that `--help` and
argument mistakes answer before torch, transformers and datasets are imported.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from ..images import DEFAULT_MAX_IMAGE_PIXELS

#: Features the probes read (`features.extract_features`).
FEATURE_KINDS = ("pooled", "n_last_blocks")

#: Share of train held out for evaluation when a dataset has no evaluation split (as in
#: transformers' image-classification examples).
DEFAULT_TRAIN_VAL_SPLIT = 0.15

PROTOCOLS = ("knn", "fast_linear", "linear")


def _arg(default=None, help: str = "", factory=None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "EsViT folder or Hub id (loaded with AutoModel)."})
    trust_remote_code: bool = _arg(False, "Run modeling code stored with a Hub model (not needed with esvit).")
    revision: str | None = _arg(None, "Hub revision (branch, tag or commit).")


@dataclass
class DataArguments:
    dataset_name: str | None = _arg(
        None, "Hub dataset id, save_to_disk folder, image folder (<split>/<class>/<image>), or folder of parquet/arrow."
    )
    dataset_config_name: str | None = _arg(None, "Hub dataset configuration.")
    train_file: str | None = _arg(None, "Parquet/arrow/csv/json file(s) of the train split.")
    eval_file: str | None = _arg(None, "Parquet/arrow/csv/json file(s) of the eval split.")
    train_split: str = _arg("train")
    eval_split: str | None = _arg(
        None, "Default: the first of validation, val, test; if none exists, --train_val_split of train is held out."
    )
    train_val_split: float | None = _arg(
        None,
        "Share of train held out (stratified, seeded by --seed) for evaluation when the dataset has no evaluation "
        f"split, e.g. an image folder of class sub-folders. Default: {DEFAULT_TRAIN_VAL_SPLIT} in that case.",
    )
    image_column: str | None = _arg(None, "Default: guessed (image, img, ...).")
    label_column: str | None = _arg(None, "Default: guessed (label, labels, ...).")
    max_train_samples: int | None = _arg(None, "Keep only the first rows (quick runs).")
    max_eval_samples: int | None = _arg(None)
    image_size: int | None = _arg(None, "Crop size; default: the model config's image_size.")
    resize_size: int | None = _arg(None, "Short side before the centre crop; default image_size * 256 / 224.")
    cache_dir: str | None = _arg(None)
    dataloader_num_workers: int = _arg(4)
    max_image_pixels: int = _arg(
        DEFAULT_MAX_IMAGE_PIXELS, "Skip images of more pixels (width x height, read from the header); 0: no cap."
    )
    max_bad_fraction: float = _arg(
        0.01, "Abort when more than this share of a split cannot be decoded (undecodable images are skipped)."
    )


@dataclass
class ProbeArguments:
    output_dir: str = field(metadata={"help": "Where results.json (and optional features) go."})
    protocol: str = _arg("knn", "knn, fast_linear, linear, a comma list, or all.")
    per_device_batch_size: int = _arg(128, "Batch per process for extraction and the full probe.")
    knn_features: str = _arg("pooled", f"Feature for k-NN: one of {FEATURE_KINDS}.")
    linear_features: str = _arg("n_last_blocks", f"Feature for the probes: one of {FEATURE_KINDS}.")
    n_last_blocks: int = _arg(4, "Blocks concatenated by the n_last_blocks feature.")
    nb_knn: list[int] = _arg(help="k values of the k-NN.", factory=lambda: [10, 20, 100, 200])
    temperature: float = _arg(0.07, "k-NN vote temperature.")
    knn_batch_size: int = _arg(1024, "Test rows per k-NN chunk.")
    lr: float = _arg(1e-3, "Full probe: learning rate per 256 images.")
    epochs: int = _arg(100, "Full probe: epochs.")
    val_freq: int = _arg(1, "Full probe: evaluate every this many epochs.")
    fast_lrs: list[float] = _arg(
        help="Fast probe: learning rates (per 256 images) swept on held-out train features.",
        factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
    )
    fast_epochs: int = _arg(100, "Fast probe: epochs.")
    fast_batch_size: int = _arg(256, "Fast probe: batch size.")
    holdout_fraction: float = _arg(0.1, "Fast probe: share of each train class held out for the sweep.")
    seed: int = _arg(0)
    cpu: bool = _arg(False, "Run on CPU (also under accelerate launch --multi_gpu).")
    save_features: bool = _arg(False, "Write the extracted features as safetensors.")
    update_model_card: bool = _arg(True, "Add the results to README.md of a local model folder.")
    dataset_display_name: str | None = _arg(None, "Dataset name shown in the model card.")
    push_to_hub: bool = _arg(False, "Upload the updated model card and results.json.")
    hub_model_id: str | None = _arg(None, "Hub repo to push to (default: the model id).")
    hub_token: str | None = _arg(None)
    process_group_timeout_minutes: int = _arg(120, "Collective timeout of the process group.")


def parse_protocols(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if names == ["all"]:
        return list(PROTOCOLS)
    unknown = [p for p in names if p not in PROTOCOLS]
    if unknown or not names:
        raise ValueError(f"unknown protocol(s) {unknown or text!r}; use {', '.join(PROTOCOLS)}, a comma list, or all.")
    return [p for p in PROTOCOLS if p in names]


# ------------------------------------------------------------------------------------ model card


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, ProbeArguments]:
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ModelArguments, DataArguments, ProbeArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, probe_args = parser.parse_json_file(os.path.abspath(argv[0]))
    else:
        model_args, data_args, probe_args = parser.parse_args_into_dataclasses(args=argv)
    parse_protocols(probe_args.protocol)  # fail before loading anything
    for name in ("knn_features", "linear_features"):
        if getattr(probe_args, name) not in FEATURE_KINDS:
            raise ValueError(f"--{name} must be one of {FEATURE_KINDS}, got {getattr(probe_args, name)!r}.")
    if not 0.0 <= data_args.max_bad_fraction <= 1.0:
        raise ValueError(f"--max_bad_fraction must lie in [0, 1], got {data_args.max_bad_fraction}.")
    if data_args.train_val_split is not None and not 0.0 < data_args.train_val_split < 1.0:
        raise ValueError(f"--train_val_split must lie in (0, 1), got {data_args.train_val_split}.")
    return model_args, data_args, probe_args


__all__ = [
    "DEFAULT_TRAIN_VAL_SPLIT",
    "FEATURE_KINDS",
    "PROTOCOLS",
    "DataArguments",
    "ModelArguments",
    "ProbeArguments",
    "parse_arguments",
    "parse_protocols",
]
