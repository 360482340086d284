"""The arguments of `run_pretraining.py`: three dataclasses and how they are read.

`ModelArguments` (which network), `DataArguments` (which images, which crops) and
`PretrainingArguments` (how to train) are parsed by transformers' `HfArgumentParser`.
Precedence: dataclass defaults < `--recipe NAME` (see `recipes`) < a YAML / JSON file (`--config
FILE`, or a lone `FILE.yaml` first argument) < the other command-line flags. `config_overrides`
(EsViTConfig fields) are merged key by key across these layers rather than replaced, and every
name (argument or config field) is checked, with the nearest valid name in the error.

This module imports only the standard library at module level, so `--help` and argument errors
answer before torch, transformers and datasets are imported.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

#: Values of `--checkpointing_steps` besides a number of optimizer steps.
CHECKPOINT_EVERY_EPOCH = "epoch"


#: File suffixes read as images in local folders (`datasets`' imagefolder reads these and more).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest valid name, or ''."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def pair(values: Sequence[float], name: str) -> tuple[float, float]:
    if len(values) != 2:
        raise ValueError(f"{name} needs two numbers (low high), got {values}.")
    return float(values[0]), float(values[1])


def _preset_names() -> list[str]:
    from ..configuration_esvit import PRESETS

    return sorted(PRESETS)


# ------------------------------------------------------------------------------------------ model
@dataclass
class ModelArguments:
    """Which network to train."""

    model_preset: str = field(
        default="swin-tiny-w7",
        metadata={"help": "Architecture preset (esvit.PRESETS), e.g. swin-tiny-w7, swin-micro, cvt-s1."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "EsViTConfig fields to change: JSON ('{\"image_size\": 64}') or 'key=value,key=value'; "
            "merged with the recipe's."
        },
    )
    init_from: str | None = field(
        default=None,
        metadata={"help": "Start student and teacher from a saved EsViTForPreTraining (or EsViTModel) folder."},
    )
    use_region_loss: bool = field(
        default=True, metadata={"help": "Add EsViT's region-matching task (false: DINO's view task only)."}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute the student's blocks."})

    def __post_init__(self):
        presets = _preset_names()
        if self.model_preset not in presets:
            raise ValueError(
                f"unknown model_preset {self.model_preset!r}{did_you_mean(self.model_preset, presets)}; "
                f"known: {', '.join(presets)}."
            )
        self.config_overrides = parse_overrides(self.config_overrides)

    def build_config(self):
        """The `EsViTConfig` to train: the preset (or `init_from`'s config) with the overrides."""
        from ..configuration_esvit import EsViTConfig

        overrides = dict(self.config_overrides or {})
        if self.init_from:
            return EsViTConfig.from_pretrained(self.init_from, **overrides)
        return EsViTConfig.from_preset(self.model_preset, **overrides)


def parse_overrides(value) -> dict | None:
    """`{"a": 1}` (a mapping from YAML, or JSON text) or `a=1,b=true` -> dict; field names checked."""
    if value is None:
        return None
    if isinstance(value, dict):
        parsed = dict(value)
    else:
        text = str(value).strip()
        if not text:
            return None
        if text.startswith("{"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"--config_overrides is not valid JSON ({err.msg} at character {err.pos}).") from None
        else:
            parsed = {}
            for item in text.split(","):
                key, sep, raw = item.partition("=")
                if not sep or not key.strip():
                    raise ValueError(f"--config_overrides item {item!r} is not key=value.")
                try:
                    parsed[key.strip()] = json.loads(raw)
                except json.JSONDecodeError:
                    parsed[key.strip()] = raw.strip()
    from ..configuration_esvit import EsViTConfig

    EsViTConfig.check_field_names(parsed)
    return parsed


# ------------------------------------------------------------------------------------------- data
@dataclass
class DataArguments:
    """Where the images come from and how they are cut into crops; the labelled monitor split."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id (e.g. 'ILSVRC/imagenet-1k') or a local dataset folder `load_dataset` reads."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    image_column: str | None = field(
        default=None, metadata={"help": "Image column; default: the first `Image` column, or 'image'/'img'."}
    )
    train_dir: str | None = field(
        default=None, metadata={"help": "Local folder of images (any depth), read with `imagefolder`."}
    )
    train_files: list[str] | None = field(
        default=None, metadata={"help": "Parquet / arrow files (or image files); glob patterns allowed."}
    )
    dataset_from_disk: str | None = field(default=None, metadata={"help": "A folder written by `save_to_disk`."})
    streaming: bool = field(default=False, metadata={"help": "Stream the data (no download, no length)."})
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Shuffle buffer of a stream."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N images."})
    dataset_cache_dir: str | None = field(default=None, metadata={"help": "`datasets` cache folder."})
    dataloader_num_workers: int = field(
        default=4, metadata={"help": "Decoding / augmentation workers per process (a stream: at most its shards)."}
    )
    max_image_pixels: int = field(
        default=40_000_000,
        metadata={"help": "Images with more pixels are skipped as undecodable (decompression-bomb guard)."},
    )
    max_bad_fraction: float = field(
        default=0.01,
        metadata={"help": "Stop when more than this fraction of the images read so far failed to decode."},
    )
    global_crop_size: int = field(default=224, metadata={"help": "Side of the 2 global crops."})
    global_crops_scale: list[float] = field(
        default_factory=lambda: [0.4, 1.0], metadata={"help": "Area fraction range of the global crops."}
    )
    local_crop_size: int = field(default=96, metadata={"help": "Side of the local crops."})
    num_local_crops: int = field(default=8, metadata={"help": "Number of local crops."})
    local_crops_scale: list[float] = field(
        default_factory=lambda: [0.05, 0.4], metadata={"help": "Area fraction range of the local crops."}
    )
    blur_probs: list[float] = field(
        default_factory=lambda: [1.0, 0.1, 0.5],
        metadata={"help": "Gaussian-blur probability of (global 1, global 2, local) crops; zeros for tiny images."},
    )
    augment_on_device: bool = field(
        default=False,
        metadata={
            "help": "Workers only decode and crop (uint8); flip, colour jitter, grey, blur, solarisation and "
            "normalisation run batched on the accelerator, drawn per sample. For GPUs whose CPU cores cannot "
            "feed the step; off by default (the CPU recipe)."
        },
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Labelled data for the periodic k-NN monitor: Hub id, image folder of class sub-folders, "
            "parquet file or save_to_disk folder (see run_linear_probe.py)."
        },
    )
    eval_dir: str | None = field(default=None, metadata={"help": "Alias of --eval_dataset_name for a local folder."})
    eval_max_samples: int = field(
        default=2000, metadata={"help": "Images per split of the k-NN monitor (train and test parts each)."}
    )
    eval_label_column: str | None = field(default=None, metadata={"help": "Label column of the monitor data."})

    def __post_init__(self):
        sources = [n for n in ("dataset_name", "train_dir", "train_files", "dataset_from_disk") if getattr(self, n)]
        if len(sources) > 1:
            raise ValueError(f"give one data source, got {', '.join('--' + s for s in sources)}.")
        for name in ("global_crops_scale", "local_crops_scale"):
            low, high = pair(getattr(self, name), name)
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {getattr(self, name)}.")
        if len(self.blur_probs) != 3:
            raise ValueError(f"blur_probs needs 3 probabilities, got {self.blur_probs}.")
        if self.dataloader_num_workers < 0 or self.num_local_crops < 0:
            raise ValueError("dataloader_num_workers and num_local_crops must be >= 0.")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must lie in [0, 1], got {self.max_bad_fraction}.")
        if self.eval_dir and self.eval_dataset_name:
            raise ValueError("give --eval_dir or --eval_dataset_name, not both.")
        self.eval_dataset_name = self.eval_dataset_name or self.eval_dir
        self.check_local_paths()

    def check_local_paths(self) -> None:
        """A missing or empty local source is a one-line error now, not a traceback after the imports."""
        for flag in ("train_dir", "dataset_from_disk", "eval_dir"):
            path = getattr(self, flag)
            if path and not Path(path).is_dir():
                raise FileNotFoundError(f"--{flag} {path!r} is not a folder.")
        if self.train_dir and not any(
            p.suffix.lower() in IMAGE_SUFFIXES for p in Path(self.train_dir).rglob("*")
        ):  # stops at the first image
            raise ValueError(f"--train_dir {self.train_dir!r} holds no image ({', '.join(IMAGE_SUFFIXES)}).")
        for file in self.train_files or []:
            if not any(c in file for c in "*?[") and "://" not in file and not Path(file).is_file():
                raise FileNotFoundError(f"--train_files: {file!r} does not exist.")

    @property
    def uses_embedded_dataset(self) -> bool:
        return not (self.dataset_name or self.train_dir or self.train_files or self.dataset_from_disk)

    def describe_source(self, public: bool = False) -> str:
        """One line naming the data, for logs; `public=True` leaves local paths out (model cards)."""
        if self.dataset_name:
            config = f" ({self.dataset_config_name})" if self.dataset_config_name else ""
            if public and Path(self.dataset_name).exists():
                return "a local dataset"
            return f"{self.dataset_name}{config}, split {self.dataset_split}"
        if self.train_dir:
            return "a local image folder" if public else f"image folder {self.train_dir}"
        if self.train_files:
            return "local data files" if public else f"files {', '.join(self.train_files)}"
        if self.dataset_from_disk:
            return "a local saved dataset" if public else f"saved dataset {self.dataset_from_disk}"
        return "the embedded Fashion-MNIST sample (500 train images, esvit/data)"

    def hub_dataset_ids(self) -> list[str]:
        """Hub dataset ids this run trained on (for the model card's `datasets:`)."""
        if self.dataset_name and not Path(self.dataset_name).exists():
            return [self.dataset_name]
        if self.uses_embedded_dataset:
            return ["zalando-datasets/fashion_mnist"]
        return []


# --------------------------------------------------------------------------------------- training
@dataclass
class PretrainingArguments:
    """How to train. Epoch-denominated values are converted to optimizer steps."""

    output_dir: str = field(default="./esvit-output", metadata={"help": "Where models, checkpoints and logs go."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace an earlier run's checkpoints and finished model instead of refusing to start."},
    )
    recipe: str | None = field(default=None, metadata={"help": "A named recipe of esvit.training.recipes."})
    config: str | None = field(default=None, metadata={"help": "YAML or JSON file of arguments."})
    seed: int = 0
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Images per process and micro-batch."})
    gradient_accumulation_steps: int = 1
    num_train_epochs: int = 100
    max_train_steps: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps to train (needed for streams). Schedules then span exactly these steps."},
    )
    learning_rate: float = field(
        default=5e-4, metadata={"help": "Peak lr for a global batch of 256 (scaled linearly)."}
    )
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    warmup_steps: int | None = field(default=None, metadata={"help": "Overrides warmup_epochs."})
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 0
    warmup_teacher_temp_steps: int | None = field(default=None, metadata={"help": "Overrides the epochs value."})
    student_temp: float = 0.1
    center_momentum: float = 0.9
    teacher_normalization: str = field(
        default="centering",
        metadata={
            "help": "Teacher targets: centering (DINO/EsViT: EMA centre + sharpening) or sinkhorn_knopp (SwAV/DINOv2).",
            "choices": ["centering", "sinkhorn_knopp"],
        },
    )
    view_loss_weight: float = field(
        default=0.5, metadata={"help": "Weight of the view term with the region task on (EsViT: 0.5)."}
    )
    region_loss_weight: float = field(
        default=0.5, metadata={"help": "Weight of the region-matching term (EsViT: 0.5; DINO's view-only runs: none)."}
    )
    koleo_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "KoLeo regulariser on the student's pooled features of each global crop (DINOv2: 0.1; "
            "EsViT: 0, off). Spreads the features of a batch apart against collapse; computed per process "
            "and micro-batch, as DINOv2 does."
        },
    )
    fused_optimizer: str = field(
        default="auto",
        metadata={
            "help": "AdamW implementation: fused (one kernel for all parameters), foreach, or auto (fused on "
            "CUDA, foreach elsewhere). All compute the same update.",
            "choices": ["auto", "fused", "foreach"],
        },
    )
    clip_grad: float = field(default=3.0, metadata={"help": "Gradient-norm clipping threshold (0 disables)."})
    clip_grad_mode: str = field(default="per_param", metadata={"choices": ["per_param", "global"]})
    freeze_last_layer_epochs: float = 1
    freeze_last_layer_steps: int | None = field(default=None, metadata={"help": "Overrides the epochs value."})
    max_consecutive_nonfinite: int = field(
        default=20,
        metadata={
            "help": "Optimizer steps with a non-finite loss or gradient are skipped; stop after this many in a row."
        },
    )
    mixed_precision: str | None = field(
        default=None,
        metadata={"help": "no, fp16 or bf16 (default: accelerate's launch config).", "choices": ["no", "fp16", "bf16"]},
    )
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile student and teacher (inductor)."})
    cpu: bool = field(default=False, metadata={"help": "Train on CPU even if a GPU is present."})
    ddp_timeout: int = field(
        default=600,
        metadata={"help": "Seconds a process waits for its peers in a collective before the run stops."},
    )
    logging_steps: int = 10
    report_to: str = field(default="tensorboard", metadata={"help": "Trackers: tensorboard, wandb, all, none, ..."})
    eval_steps: int | None = field(
        default=None, metadata={"help": "Run the k-NN monitor every N optimizer steps (default: 10 times a run)."}
    )
    checkpointing_steps: str | None = field(
        default=None, metadata={"help": "Save a resumable state every N optimizer steps, or 'epoch'."}
    )
    checkpoints_total_limit: int | None = field(default=3, metadata={"help": "Keep only the last K checkpoints."})
    save_models_at_checkpoints: bool = field(
        default=False, metadata={"help": "Also write model/ and pretraining/ folders into every checkpoint."}
    )
    on_checkpoint_error: str = field(
        default="stop",
        metadata={
            "help": "A checkpoint that cannot be written (disk full): stop the run, or continue.",
            "choices": ["stop", "continue"],
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "'latest' (in output_dir/checkpoints; starts fresh when there is none) or a checkpoint folder."
        },
    )
    collapse_patience_steps: int = field(
        default=200, metadata={"help": "Warn when the teacher entropy stays near 0 or log K this long (0: never)."}
    )
    record_sample_keys: bool = field(
        default=False, metadata={"help": "Write the content keys of the images each process trained on (audit)."}
    )
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_token: str | None = None
    hub_private_repo: bool = False

    def __post_init__(self):
        positive = ("per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "logging_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("max_train_steps", "checkpoints_total_limit", "eval_steps", "max_consecutive_nonfinite"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 when given, got {value}.")
        for name in ("view_loss_weight", "region_loss_weight", "koleo_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.checkpointing_steps is not None:
            value = str(self.checkpointing_steps).strip()
            if value != CHECKPOINT_EVERY_EPOCH and not (value.isdigit() and int(value) >= 1):
                raise ValueError(f"checkpointing_steps must be a number of steps >= 1 or 'epoch', got {value!r}.")
            self.checkpointing_steps = value
        if self.ddp_timeout < 1:
            raise ValueError(f"ddp_timeout must be >= 1 second, got {self.ddp_timeout}.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id.")

    def checkpoint_interval(self, steps_per_epoch: int | None) -> int | None:
        """Optimizer steps between checkpoints (None: no periodic checkpoints)."""
        if self.checkpointing_steps is None:
            return None
        if self.checkpointing_steps == CHECKPOINT_EVERY_EPOCH:
            if steps_per_epoch is None:
                raise ValueError("--checkpointing_steps epoch needs data of known length; give a number of steps.")
            return steps_per_epoch
        return int(self.checkpointing_steps)


ARGUMENT_CLASSES = (ModelArguments, DataArguments, PretrainingArguments)


def argument_names() -> set[str]:
    return {f.name for cls in ARGUMENT_CLASSES for f in fields(cls)}


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, PretrainingArguments]:
    """Parse `argv` into the three dataclasses (see the module docstring for the precedence).

    Without a data source and without a recipe, the recipe `recipes.DEFAULT_RECIPE` is used.
    """
    from .recipes import get_recipe

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml", ".json")):
        argv = ["--config", argv[0], *argv[1:]]
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--recipe")
    known, rest = pre.parse_known_args(argv)
    file_values = read_config_file(known.config) if known.config else {}
    check_argument_names(file_values, f"{known.config}")
    recipe = known.recipe or file_values.pop("recipe", None)

    def parse(recipe_name: str | None):
        recipe_values = get_recipe(recipe_name) if recipe_name else {}
        check_argument_names(recipe_values, f"recipe {recipe_name}")
        # config_overrides merge key by key: recipe < file < command line; the recipe's apply only to
        # the recipe's own preset (a run that names another preset does not inherit them).
        recipe_overrides = parse_overrides(recipe_values.pop("config_overrides", None)) or {}
        file_overrides = parse_overrides(file_values.get("config_overrides")) or {}
        defaults = {**recipe_values, **{k: v for k, v in file_values.items() if k != "config_overrides"}}
        defaults.update(recipe=recipe_name, config=known.config, config_overrides=None)
        from transformers import HfArgumentParser

        parser = HfArgumentParser(ARGUMENT_CLASSES)
        parser.set_defaults(**defaults)
        _reject_unknown_flags(parser, rest)
        values = vars(parser.parse_args(rest))
        # The data and training checks (stdlib only) run before the model's, which import transformers'
        # config classes and so torch: a missing folder is reported in a second.
        data_args, train_args, model_args = (
            cls(**{f.name: values[f.name] for f in fields(cls) if f.init})
            for cls in (DataArguments, PretrainingArguments, ModelArguments)
        )
        if model_args.model_preset != recipe_values.get("model_preset", model_args.model_preset):
            recipe_overrides = {}
        merged = {**recipe_overrides, **file_overrides, **(model_args.config_overrides or {})}
        model_args.config_overrides = merged or None
        return model_args, data_args, train_args

    model_args, data_args, train_args = parse(recipe)
    if recipe is None:
        default = hardware_default_recipe(data_args, train_args)
        if default is not None:
            model_args, data_args, train_args = parse(default)
    try:  # a wrong architecture fails now, in one line, not after the data is loaded
        model_args.build_config()
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"the model configuration is invalid: {err}") from None
    except Exception as err:  # huggingface_hub's strict-dataclass validation errors
        raise ValueError(f"the model configuration is invalid: {' '.join(str(err).split())}") from None
    return model_args, data_args, train_args


#: The recipe a run without `--recipe` gets on a machine without a GPU, for the user's own data:
#: full-size defaults (224-px crops, Swin-T) would take hours per epoch there.
CPU_RECIPE = "small-images-cpu"


def hardware_default_recipe(data_args: DataArguments, train_args: PretrainingArguments) -> str | None:
    """The recipe to use when none was named: the tiny default on the embedded sample, the
    small-image recipe for one's own data on a CPU-only machine, else none (the dataclass defaults,
    which are the original's full-size ImageNet settings)."""
    from .recipes import DEFAULT_RECIPE

    if data_args.uses_embedded_dataset:
        return DEFAULT_RECIPE
    import torch

    if train_args.cpu or not torch.cuda.is_available():
        import logging

        logging.getLogger(__name__).warning(
            "No --recipe and no GPU: using the %r recipe (small crops, a small model) for your own data; name "
            "--recipe (or give every argument) to train otherwise.",
            CPU_RECIPE,
        )
        return CPU_RECIPE
    return None


def _reject_unknown_flags(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """A misspelt flag is an error naming the nearest valid one (argparse would only list it)."""
    valid = [opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")]
    for token in argv:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            if flag not in valid and not any(v.startswith(flag) for v in valid):
                raise SystemExit(f"run_pretraining.py: error: unknown argument {flag}{did_you_mean(flag, valid)}.")


def read_config_file(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path} does not exist.")
    text = file.read_text()
    if path.endswith(".json"):
        values = json.loads(text)
    else:
        import yaml

        values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of argument names to values.")
    return values


def check_argument_names(values: dict, where: str) -> None:
    """Every key of a recipe or config file must be an argument name."""
    known = argument_names()
    for name in sorted(set(values) - known):
        raise ValueError(f"unknown argument {name!r} in {where}{did_you_mean(name, known)}.")


__all__ = [
    "ARGUMENT_CLASSES",
    "DataArguments",
    "ModelArguments",
    "PretrainingArguments",
    "check_argument_names",
    "did_you_mean",
    "parse_arguments",
    "parse_overrides",
]
