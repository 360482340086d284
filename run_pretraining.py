#!/usr/bin/env python
"""Pretrain an EsViT model with 🤗 Accelerate.

EsViT (Li et al., "Efficient Self-supervised Vision Transformers for Representation Learning",
ICLR 2022, arXiv:2106.09785): a multi-stage backbone trained by self-distillation between a
student (all crops) and its EMA teacher (the 2 global crops), at the view level (DINO) and at the
region level (each student region matched to the most similar teacher region).

    python run_pretraining.py                          # tiny run on the embedded sample (CPU, ~1 min)
    python run_pretraining.py my_run.yaml              # arguments from a YAML or JSON file
    python run_pretraining.py --config my_run.yaml --max_train_steps 100   # file + overrides
    accelerate launch --num_processes 8 run_pretraining.py \\
        --recipe esvit-swin-tiny-imagenet --train_dir /data/imagenet/train --output_dir esvit-swin-t

Outputs in `--output_dir`: `model/` (the teacher backbone, `AutoModel.from_pretrained` after
`import esvit`), `pretraining/` (backbone + both heads + loss centres, for `--init_from`),
`checkpoints/step_*` (`--checkpointing_steps`, resumable with `--resume_from_checkpoint`),
`train_summary.json` and the tracker logs.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import HfArgumentParser

import esvit
from esvit import EsViTConfig, EsViTForPreTraining
from esvit.training.data import (
    DataArguments,
    MultiCropCollator,
    build_augmentation,
    build_pretraining_loader,
    load_pretraining_images,
)
from esvit.training.loss import EsViTLoss
from esvit.training.optim import cancel_last_layer_gradients, clip_gradients, get_param_groups, update_teacher
from esvit.training.recipes import DEFAULT_RECIPE, get_recipe
from esvit.training.schedules import build_schedules

logger = get_logger(__name__)

LOSS_STATE_FILE = "esvit_loss.safetensors"
COMPLETE_MARKER = "checkpoint_complete.json"
SUMMARY_FILE = "train_summary.json"
# Teacher view entropy (fraction of log K) outside which the run is reported as collapsing.
COLLAPSE_LOW, COLLAPSE_HIGH = 0.02, 0.98


# ======================================================================================= arguments
@dataclass
class ModelArguments:
    """Which network to train."""

    model_preset: str = field(
        default="swin-tiny-w7", metadata={"help": f"Architecture preset: {', '.join(sorted(esvit.PRESETS))}."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "EsViTConfig fields to change: JSON ('{\"image_size\": 64}') or 'key=value,key=value'."},
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
        if self.model_preset not in esvit.PRESETS:
            raise ValueError(f"unknown model_preset {self.model_preset!r}; known: {', '.join(sorted(esvit.PRESETS))}.")
        self.config_overrides = _parse_overrides(self.config_overrides)

    def build_config(self) -> EsViTConfig:
        overrides = dict(self.config_overrides or {})
        if self.init_from:
            return EsViTConfig.from_pretrained(self.init_from, **overrides)
        return EsViTConfig.from_preset(self.model_preset, **overrides)


def _parse_overrides(value) -> dict | None:
    """`{"a": 1}` (a mapping from YAML, or JSON text) or `a=1,b=true` -> dict."""
    if value is None or isinstance(value, dict):
        return value
    text = str(value).strip()
    if not text:
        return None
    if text.startswith("{"):
        return json.loads(text)
    parsed = {}
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"config_overrides item {item!r} is not key=value.")
        try:
            parsed[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[key.strip()] = raw.strip()
    return parsed


@dataclass
class PretrainingArguments:
    """How to train. Epoch-denominated values are converted to optimizer steps."""

    output_dir: str = field(default="./esvit-output", metadata={"help": "Where models, checkpoints and logs go."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Delete earlier checkpoints in output_dir instead of refusing to start."}
    )
    recipe: str | None = field(
        default=None, metadata={"help": "A named recipe of esvit.training.recipes (defaults first)."}
    )
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
    clip_grad: float = field(default=3.0, metadata={"help": "Gradient-norm clipping threshold (0 disables)."})
    clip_grad_mode: str = field(default="per_param", metadata={"choices": ["per_param", "global"]})
    freeze_last_layer_epochs: float = 1
    freeze_last_layer_steps: int | None = field(default=None, metadata={"help": "Overrides the epochs value."})
    mixed_precision: str | None = field(
        default=None,
        metadata={"help": "no, fp16 or bf16 (default: accelerate's launch config).", "choices": ["no", "fp16", "bf16"]},
    )
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile student and teacher (inductor)."})
    cpu: bool = field(default=False, metadata={"help": "Train on CPU even if a GPU is present."})
    logging_steps: int = 10
    report_to: str = field(default="tensorboard", metadata={"help": "Trackers: tensorboard, wandb, all, none, ..."})
    checkpointing_steps: int | None = field(default=None, metadata={"help": "Save a resumable state every N steps."})
    checkpoints_total_limit: int | None = field(default=3, metadata={"help": "Keep only the last K checkpoints."})
    save_models_at_checkpoints: bool = field(
        default=False, metadata={"help": "Also write model/ and pretraining/ folders into every checkpoint."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' (in output_dir/checkpoints) or a checkpoint folder."}
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
        for name in ("max_train_steps", "checkpointing_steps", "checkpoints_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 when given, got {value}.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id.")


ARGUMENT_CLASSES = (ModelArguments, DataArguments, PretrainingArguments)


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, PretrainingArguments]:
    """Parse `argv` into the three dataclasses.

    Precedence: dataclass defaults < `--recipe` < config file (`--config FILE` or a lone
    `FILE.yaml|.yml|.json` first argument) < the other command-line flags. Without a data source
    and without a recipe, the `tiny-cpu-default` recipe is used.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml", ".json")):
        argv = ["--config", argv[0], *argv[1:]]
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--recipe")
    known, rest = pre.parse_known_args(argv)
    file_values = _read_config_file(known.config) if known.config else {}
    recipe = known.recipe or file_values.pop("recipe", None)

    def parse(recipe_name: str | None):
        defaults = {**(get_recipe(recipe_name) if recipe_name else {}), **file_values}
        defaults.update(recipe=recipe_name, config=known.config)
        _check_argument_names(defaults)
        parser = HfArgumentParser(ARGUMENT_CLASSES)
        parser.set_defaults(**defaults)
        return parser.parse_args_into_dataclasses(args=rest)

    model_args, data_args, train_args = parse(recipe)
    if recipe is None and data_args.uses_embedded_dataset:
        model_args, data_args, train_args = parse(DEFAULT_RECIPE)
    return model_args, data_args, train_args


def _read_config_file(path: str) -> dict:
    text = Path(path).read_text()
    if path.endswith(".json"):
        values = json.loads(text)
    else:
        import yaml

        values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of argument names to values.")
    return values


def _check_argument_names(values: dict) -> None:
    known = {f.name for cls in ARGUMENT_CLASSES for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown arguments {unknown}; valid names: {', '.join(sorted(known))}.")


# ========================================================================================= helpers
@dataclass
class TrainingProgress:
    """Optimizer steps done: checkpointed with `register_for_checkpointing`."""

    global_step: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.global_step = int(state["global_step"])


@dataclass
class DataPosition:
    """Where this process is in its data; saved per process, because stream shards differ."""

    epoch: int = 0
    batches_done: int = 0  # batches of `epoch` already trained on
    images_seen: int = 0
    skipped_images: int = 0

    def save(self, folder: Path, rank: int) -> None:
        (folder / f"data_position_rank{rank}.json").write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, folder: Path, rank: int) -> DataPosition:
        path = folder / f"data_position_rank{rank}.json"
        if not path.is_file():
            # More processes than when the checkpoint was written: follow process 0.
            logger.warning(f"{path.name} missing in {folder}; this process follows process 0's position.")
            path = folder / "data_position_rank0.json"
        return cls(**json.loads(path.read_text()))


class MetricWindow:
    """Sums of the per-micro-batch loss outputs between two log points (kept on the device)."""

    NAMES = ("loss", "view_loss", "region_loss", "teacher_entropy", "teacher_region_entropy")

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.NAMES) + 3, device=self.device)  # + micro-batches, images, skipped

    def add(self, out, num_images: int, num_skipped: int) -> None:
        zero = torch.zeros((), device=self.device)
        values = [
            out.loss.detach(),
            out.view_loss,
            out.region_loss if out.region_loss is not None else zero,
            out.teacher_view_entropy,
            out.teacher_region_entropy if out.teacher_region_entropy is not None else zero,
        ]
        self.sums[: len(values)] += torch.stack([v.float() for v in values])
        self.sums[len(values) :] += torch.tensor([1.0, num_images, num_skipped], device=self.device)

    def reduce(self, accelerator: Accelerator) -> tuple[dict[str, float], int, int]:
        """Means over all processes and micro-batches, plus images and skipped images (all processes)."""
        total = accelerator.reduce(self.sums.clone(), reduction="sum").tolist()
        count = max(total[len(self.NAMES)], 1.0)
        means = {name: total[i] / count for i, name in enumerate(self.NAMES)}
        self.reset()
        return means, int(total[-2]), int(total[-1])


class CollapseMonitor:
    """Warn when the teacher's view entropy stays near 0 (one prototype per image, typically the
    same one) or near log K (uniform outputs): DINO's two collapse modes (Caron et al. 2021, §5.3)."""

    def __init__(self, out_dim: int, patience_steps: int):
        self.log_k = math.log(out_dim)
        self.patience = patience_steps
        self.run_steps = 0
        self.warned = False

    def update(self, entropy: float, steps: int, global_step: int) -> None:
        if self.patience <= 0:
            return
        fraction = entropy / self.log_k
        if COLLAPSE_LOW < fraction < COLLAPSE_HIGH:
            self.run_steps, self.warned = 0, False
            return
        self.run_steps += steps
        if self.run_steps >= self.patience and not self.warned:
            mode = "near 0" if fraction <= COLLAPSE_LOW else "near log K"
            logger.warning(
                f"Possible collapse at step {global_step}: the teacher entropy has been {mode} "
                f"({entropy:.3f} of log K = {self.log_k:.3f}) for {self.run_steps} steps. Consider a lower "
                "teacher temperature, a higher centre momentum, or a lower learning rate."
            )
            self.warned = True


def _steps(epochs_value: float, steps_value: int | None, steps_per_epoch: int | None, name: str) -> int:
    """An epoch-denominated length in optimizer steps (`*_steps` wins when given)."""
    if steps_value is not None:
        return steps_value
    if epochs_value == 0:
        return 0
    if steps_per_epoch is None:
        raise ValueError(
            f"{name}_epochs needs the number of steps per epoch, which a stream of unknown length does not "
            f"have: give {name}_steps (or 0 epochs)."
        )
    return round(epochs_value * steps_per_epoch)


def _checkpoint_step(folder: Path) -> int:
    return int(folder.name.split("_")[-1])


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if (p / COMPLETE_MARKER).is_file()]
    return sorted(done, key=_checkpoint_step)


def save_checkpoint(accelerator: Accelerator, root: Path, step: int, position: DataPosition, keep: int | None) -> Path:
    """`accelerator.save_state` + this process's data position; the marker is written last."""
    folder = root / f"step_{step:08d}"
    accelerator.save_state(str(folder))
    position.save(folder, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (folder / COMPLETE_MARKER).write_text(json.dumps({"global_step": step}))
        if keep is not None:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return folder


def resolve_checkpoint(value: str, root: Path) -> Path:
    if value == "latest":
        found = list_checkpoints(root)
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint under {root}.")
        return found[-1]
    folder = Path(value)
    if not (folder / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"{folder} is not a complete checkpoint (no {COMPLETE_MARKER}).")
    return folder


def save_teacher(
    teacher: EsViTForPreTraining,
    loss_fn: EsViTLoss,
    folder: Path,
    student_config: EsViTConfig,
    card: dict,
) -> None:
    """Write `model/` (EsViTModel) and `pretraining/` (EsViTForPreTraining + loss centres), each
    with its image-processor config and a model card."""
    # The teacher runs without drop-path; the saved config keeps the trained architecture's value.
    runtime_rate = teacher.config.drop_path_rate
    teacher.config.drop_path_rate = student_config.drop_path_rate
    try:
        teacher.esvit.save_pretrained(folder / "model")
        teacher.save_pretrained(folder / "pretraining")
    finally:
        teacher.config.drop_path_rate = runtime_rate
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in loss_fn.state_dict().items()},
        str(folder / "pretraining" / LOSS_STATE_FILE),
    )
    (folder / "model" / "README.md").write_text(model_card(card, with_heads=False))
    (folder / "pretraining" / "README.md").write_text(model_card(card, with_heads=True))


def model_card(info: dict, with_heads: bool) -> str:
    """A Hub model card: what was trained, on what, how long, with which hyper-parameters."""
    config = info["config"]
    what = (
        "the EsViT backbone, its view-level head (`head`) and region-level head (`head_dense`), and the "
        f"loss centres (`{LOSS_STATE_FILE}`)"
        if with_heads
        else "the EsViT backbone (the EMA teacher)"
    )
    cls = "EsViTForPreTraining" if with_heads else "AutoModel"
    load = (
        "from esvit import EsViTForPreTraining\nmodel = EsViTForPreTraining.from_pretrained(folder)"
        if with_heads
        else "from transformers import AutoModel\n"
        "model = AutoModel.from_pretrained(folder)  # without esvit installed: trust_remote_code=True"
    )
    levels = "view level (DINO) and region level" if info["region"] else "view level (DINO)"
    hparams = "\n".join(f"| `{k}` | `{v}` |" for k, v in sorted(info["hyperparameters"].items()))
    loss = info.get("final_metrics") or {}
    loss_text = ", ".join(f"{k} {v:.4f}" for k, v in loss.items() if isinstance(v, float)) or "not logged"
    epochs = f"{info['global_step'] / info['steps_per_epoch']:.2f} epochs" if info["steps_per_epoch"] else "a stream"
    tags = "\n".join(f"- {t}" for t in ("esvit", "self-supervised-learning", "image-feature-extraction", "vision"))
    return f"""---
library_name: transformers
tags:
{tags}
pipeline_tag: image-feature-extraction
---

# EsViT {info["preset"]} ({"pretraining heads" if with_heads else "backbone"})

This folder holds {what}, trained with EsViT (Li et al., "Efficient Self-supervised Vision
Transformers for Representation Learning", ICLR 2022, arXiv:2106.09785): self-distillation of a
student into an exponential-moving-average teacher at the {levels}.
The weights are the teacher's.

## Architecture

- backbone: `{config["backbone_type"]}`, widths {config["hidden_sizes"]}, depths {config["depths"]},
  heads {config["num_heads"]}, window {config["window_size"]}, image size {config["image_size"]}
- {info["num_parameters"] / 1e6:.2f} M backbone parameters; feature size {config["hidden_sizes"][-1]}
- heads: DINO heads with {config["head_out_dim"]} prototypes (hidden {config["head_hidden_dim"]},
  bottleneck {config["head_bottleneck_dim"]})

## Training

- data: {info["data"]}
- {info["global_step"]} optimizer steps ({epochs}), global batch {info["global_batch_size"]} =
  {info["num_processes"]} process(es) x {info["per_device_batch_size"]} images
  x {info["gradient_accumulation_steps"]} accumulation step(s)
- tasks: view-level{" + region-level matching" if info["region"] else " only (DINO)"}
- final training metrics (mean of the last logging window): {loss_text}
- {info["images_seen"]} images trained on, {info["skipped_images"]} skipped as undecodable

| hyper-parameter | value |
|---|---|
{hparams}

## Use

```python
import esvit  # registers the esvit model type with transformers
{load}
```

`{cls}` expects images preprocessed by the image processor saved here
(`AutoImageProcessor.from_pretrained(folder)`): resize, centre crop {config["image_size"]}, ImageNet
normalisation.
"""


def push_outputs(output_dir: Path, repo_id: str, token: str | None, private: bool, api=None) -> str:
    """Upload `model/` as the repo root (AutoModel loads the repo id) and `pretraining/` beside it."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(output_dir / "model"), commit_message="EsViT backbone")
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir / "pretraining"),
        path_in_repo="pretraining",
        commit_message="EsViT backbone with pretraining heads",
    )
    return str(url)


def _tracker_config(*dataclasses_) -> dict:
    """All arguments as scalars (for trackers and model cards), without secrets."""
    flat = {}
    for obj in dataclasses_:
        for key, value in asdict(obj).items():
            if key != "hub_token":
                flat[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _trackers(report_to: str) -> list[str] | str | None:
    if report_to in ("none", ""):
        return None
    if report_to == "all":
        return "all"
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    if "tensorboard" in names:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            logging.getLogger(__name__).warning("tensorboard is not installed: not logging to it.")
            names.remove("tensorboard")
    return names or None


# ========================================================================================== train
def train(model_args: ModelArguments, data_args: DataArguments, args: PretrainingArguments) -> dict:
    """Pretrain; return the run summary (also written to `output_dir/train_summary.json`)."""
    output_dir = Path(args.output_dir)
    checkpoint_root = output_dir / "checkpoints"

    # ============ accelerator ... ============
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=_trackers(args.report_to),
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        dynamo_backend="inductor" if args.torch_compile else None,
        # View-only training leaves the region head out of the loss; DDP must then look for it.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=not model_args.use_region_loss)],
    )
    try:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
        if not accelerator.is_local_main_process:
            datasets.utils.logging.set_verbosity_error()
            transformers.utils.logging.set_verbosity_error()
        if not args.resume_from_checkpoint and list_checkpoints(checkpoint_root):
            if not args.overwrite_output_dir:
                raise FileExistsError(
                    f"{checkpoint_root} holds checkpoints of an earlier run: pass --resume_from_checkpoint latest "
                    "to continue it, --overwrite_output_dir to start over, or another --output_dir."
                )
            accelerator.wait_for_everyone()  # every process has looked before the folder goes
            if accelerator.is_main_process:
                shutil.rmtree(checkpoint_root)
        accelerator.wait_for_everyone()
        set_seed(args.seed)
        logger.info(f"Recipe: {args.recipe or 'none'}; data: {data_args.describe_source()}")
        logger.info(accelerator.state)

        # ============ data ... ============
        with accelerator.main_process_first():
            dataset = load_pretraining_images(data_args)
        collator = MultiCropCollator(build_augmentation(data_args), seed=args.seed)
        loader = build_pretraining_loader(
            dataset,
            accelerator=accelerator,
            collator=collator,
            batch_size=args.per_device_train_batch_size,
            num_workers=data_args.dataloader_num_workers,
            seed=args.seed,
            shuffle_buffer_size=data_args.shuffle_buffer_size,
        )
        batches_per_epoch = loader.batches_per_epoch
        if batches_per_epoch is None:  # a stream: use the split size if the dataset card gives it
            split_info = (dataset.info.splits or {}).get(data_args.dataset_split) if dataset.info else None
            if split_info is not None and split_info.num_examples:
                num_examples = min(split_info.num_examples, data_args.max_train_samples or split_info.num_examples)
                batches_per_epoch = num_examples // (args.per_device_train_batch_size * accelerator.num_processes)
        steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps) if batches_per_epoch else None

        # ============ networks ... ============
        config = model_args.build_config()
        if data_args.global_crop_size != config.image_size:
            logger.warning(
                f"global_crop_size {data_args.global_crop_size} differs from the model's image_size "
                f"{config.image_size}: attention windows stay sized for {config.image_size}."
            )
        if model_args.init_from:
            student = EsViTForPreTraining.from_pretrained(model_args.init_from, config=config)
        else:
            student = EsViTForPreTraining(config)
        if model_args.gradient_checkpointing:
            student.gradient_checkpointing_enable()
        # The original's teacher: same network without drop-path, never given gradients, left in
        # train mode (BatchNorm heads / CvT use batch statistics as in the original).
        teacher_config = copy.deepcopy(config)
        teacher_config.drop_path_rate = 0.0
        teacher = EsViTForPreTraining(teacher_config)
        teacher.load_state_dict(student.state_dict())
        teacher.requires_grad_(False)
        has_batchnorm = any(isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) for m in student.modules())
        if has_batchnorm and accelerator.num_processes > 1 and accelerator.device.type == "cuda":
            student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = torch.nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        student.train()
        teacher.train()
        teacher.to(accelerator.device)
        teacher_forward = torch.compile(teacher) if args.torch_compile else teacher

        # ============ loss ... ============
        loss_fn = EsViTLoss(
            out_dim=config.head_out_dim,
            num_global_crops=2,
            student_temp=args.student_temp,
            center_momentum=args.center_momentum,
            use_region_loss=model_args.use_region_loss,
        ).to(accelerator.device)
        if model_args.init_from and (Path(model_args.init_from) / LOSS_STATE_FILE).is_file():
            loss_fn.load_state_dict(load_file(str(Path(model_args.init_from) / LOSS_STATE_FILE)))

        # ============ optimizer ... ============
        optimizer = torch.optim.AdamW(get_param_groups(student))  # lr and wd are set every step
        student, optimizer = accelerator.prepare(student, optimizer)
        unwrapped = accelerator.unwrap_model(student, keep_torch_compile=False)

        # ============ schedules ... ============
        global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        common = dict(
            global_batch_size=global_batch,
            base_lr=args.learning_rate,
            min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            weight_decay_end=args.weight_decay_end,
            momentum_teacher=args.momentum_teacher,
            warmup_teacher_temp=args.warmup_teacher_temp,
            teacher_temp=args.teacher_temp,
        )
        if args.max_train_steps is None and steps_per_epoch is None:
            raise ValueError("the stream's length is unknown: give --max_train_steps.")
        total_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
        epoch_based = (
            args.max_train_steps is None
            and args.warmup_steps is None
            and args.warmup_teacher_temp_steps is None
            and float(args.warmup_epochs).is_integer()
            and float(args.warmup_teacher_temp_epochs).is_integer()
        )
        if epoch_based:
            # The original's schedules (per-epoch teacher temperature), bit for bit.
            schedules = build_schedules(
                epochs=args.num_train_epochs,
                steps_per_epoch=steps_per_epoch,
                warmup_epochs=int(args.warmup_epochs),
                warmup_teacher_temp_epochs=int(args.warmup_teacher_temp_epochs),
                **common,
            )
        else:
            # Step-denominated: every schedule spans exactly `total_steps`; warm-ups in steps and
            # the teacher temperature rises per step instead of per epoch.
            warmup = _steps(args.warmup_epochs, args.warmup_steps, steps_per_epoch, "warmup")
            temp_warmup = _steps(
                args.warmup_teacher_temp_epochs, args.warmup_teacher_temp_steps, steps_per_epoch, "warmup_teacher_temp"
            )
            if max(warmup, temp_warmup) > total_steps:
                logger.warning(f"warm-ups ({warmup}, {temp_warmup} steps) cut to the {total_steps} training steps.")
            schedules = build_schedules(
                epochs=total_steps,
                steps_per_epoch=1,
                warmup_epochs=min(warmup, total_steps),
                warmup_teacher_temp_epochs=min(temp_warmup, total_steps),
                **common,
            )
        freeze_last_layer_steps = _steps(
            args.freeze_last_layer_epochs, args.freeze_last_layer_steps, steps_per_epoch, "freeze_last_layer"
        )

        # ============ checkpoint state / resume ... ============
        progress = TrainingProgress()
        accelerator.register_for_checkpointing(teacher, loss_fn, progress)
        position = DataPosition()
        if args.resume_from_checkpoint:
            folder = resolve_checkpoint(args.resume_from_checkpoint, checkpoint_root)
            accelerator.load_state(str(folder))
            position = DataPosition.load(folder, accelerator.process_index)
            logger.info(f"Resumed from {folder} at step {progress.global_step} (epoch {position.epoch}).")

        if accelerator.is_main_process:
            accelerator.init_trackers("esvit-pretraining", config=_tracker_config(model_args, data_args, args))
        logger.info(
            f"{total_steps} optimizer steps of {global_batch} images ({accelerator.num_processes} processes x "
            f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps}); "
            f"{steps_per_epoch or 'unknown'} steps per epoch; peak lr {schedules.lr.max():.3g}."
        )

        # ============ training loop ... ============
        card = {  # the run's description for the model cards; progress fields are updated when saving
            "config": config.to_dict(),
            "preset": f"initialised from {model_args.init_from}" if model_args.init_from else model_args.model_preset,
            "region": model_args.use_region_loss,
            "num_parameters": sum(p.numel() for p in teacher.esvit.parameters()),
            "data": data_args.describe_source(),
            "steps_per_epoch": steps_per_epoch,
            "global_batch_size": global_batch,
            "num_processes": accelerator.num_processes,
            "per_device_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "hyperparameters": _tracker_config(model_args, data_args, args),
        }
        window = MetricWindow(accelerator.device)
        monitor = CollapseMonitor(config.head_out_dim, args.collapse_patience_steps)
        final_metrics: dict[str, float] = {}
        # Images over the whole training (all processes, earlier runs of a resumed training too).
        counts = accelerator.reduce(
            torch.tensor([position.images_seen, position.skipped_images], device=accelerator.device), "sum"
        ).tolist()
        totals = {"images_seen": int(counts[0]), "skipped_images": int(counts[1])}
        seen_keys: list[list[int]] = []
        steps_at_start = progress.global_step
        last_saved = progress.global_step if args.resume_from_checkpoint else None
        progress_bar = tqdm(
            total=total_steps, initial=progress.global_step, disable=not accelerator.is_local_main_process
        )
        start_time = time.perf_counter()
        while progress.global_step < total_steps:
            skipped_batches, batches_this_epoch = position.batches_done, 0
            for batch in loader.epoch(position.epoch, skip_batches=skipped_batches, accelerator=accelerator):
                crops = batch["crops"]
                if not crops:
                    raise RuntimeError(
                        f"every image of a batch failed to decode ({batch['skipped']}): the data is broken."
                    )
                batches_this_epoch += 1
                position.batches_done += 1
                position.images_seen += crops[0].shape[0]
                position.skipped_images += batch["num_skipped"]
                if args.record_sample_keys:
                    seen_keys.extend([progress.global_step, position.epoch, k] for k in batch["keys"].tolist())
                step = progress.global_step
                with accelerator.accumulate(student):
                    with torch.no_grad(), accelerator.autocast():
                        teacher_out = teacher_forward(crops[:2])  # the teacher sees the global crops
                    student_out = student(crops)
                    # under accumulation the centres move once per optimizer step (step_centers)
                    out = loss_fn(
                        student_out,
                        teacher_out,
                        teacher_temp=float(schedules.teacher_temp[step]),
                        update_centers=args.gradient_accumulation_steps == 1,
                    )
                    accelerator.backward(out.loss)
                    if accelerator.sync_gradients:
                        for i, group in enumerate(optimizer.param_groups):
                            group["lr"] = float(schedules.lr[step])
                            if i == 0:  # only the first group is regularised
                                group["weight_decay"] = float(schedules.weight_decay[step])
                        if args.clip_grad:
                            accelerator.unscale_gradients()
                            clip_gradients(unwrapped, args.clip_grad, mode=args.clip_grad_mode)
                        cancel_last_layer_gradients(unwrapped, step, freeze_last_layer_steps)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                window.add(out, crops[0].shape[0], batch["num_skipped"])
                if not accelerator.sync_gradients:
                    continue

                # ---- one optimizer step done ----
                loss_fn.step_centers()
                update_teacher(unwrapped, teacher, float(schedules.teacher_momentum[step]))
                progress.global_step += 1
                progress_bar.update(1)
                done = progress.global_step >= total_steps
                if progress.global_step % args.logging_steps == 0 or done:
                    means, images, skipped = window.reduce(accelerator)
                    totals["images_seen"] += images
                    totals["skipped_images"] += skipped
                    if not math.isfinite(means["loss"]):
                        raise FloatingPointError(f"the loss is {means['loss']} at step {progress.global_step}.")
                    metrics = {
                        **means,
                        "lr": float(schedules.lr[step]),
                        "weight_decay": float(schedules.weight_decay[step]),
                        "teacher_momentum": float(schedules.teacher_momentum[step]),
                        "teacher_temp": float(schedules.teacher_temp[step]),
                        "epoch": position.epoch + position.batches_done / (batches_per_epoch or math.inf),
                        "images_seen": totals["images_seen"],
                        "skipped_images": totals["skipped_images"],
                    }
                    if not model_args.use_region_loss:
                        metrics.pop("region_loss")
                        metrics.pop("teacher_region_entropy")
                    final_metrics = {k: means[k] for k in ("loss", "view_loss", "region_loss") if k in metrics}
                    accelerator.log(metrics, step=progress.global_step)
                    monitor.update(means["teacher_entropy"], args.logging_steps, progress.global_step)
                    progress_bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                    logger.info(
                        f"step {progress.global_step}/{total_steps} "
                        + " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
                    )
                if args.checkpointing_steps and progress.global_step % args.checkpointing_steps == 0:
                    folder = save_checkpoint(
                        accelerator, checkpoint_root, progress.global_step, position, args.checkpoints_total_limit
                    )
                    last_saved = progress.global_step
                    if args.save_models_at_checkpoints and accelerator.is_main_process:
                        card.update(totals, global_step=progress.global_step, final_metrics=final_metrics)
                        save_teacher(teacher, loss_fn, folder, config, card)
                if done:
                    break
            else:  # the epoch is exhausted
                if batches_this_epoch == 0 and skipped_batches == 0:
                    rank = accelerator.process_index
                    raise RuntimeError(f"epoch {position.epoch} yielded no batch on process {rank}.")
                position.epoch += 1
                position.batches_done = 0
        progress_bar.close()
        train_seconds = time.perf_counter() - start_time

        # ============ outputs ... ============
        if args.checkpointing_steps and last_saved != progress.global_step:
            save_checkpoint(accelerator, checkpoint_root, progress.global_step, position, args.checkpoints_total_limit)
        if args.record_sample_keys:
            keys_dir = output_dir / "sample_keys"
            keys_dir.mkdir(parents=True, exist_ok=True)
            (keys_dir / f"rank{accelerator.process_index}.json").write_text(json.dumps(seen_keys))
        accelerator.wait_for_everyone()

        steps_run = progress.global_step - steps_at_start
        summary = {
            "num_processes": accelerator.num_processes,
            "device": str(accelerator.device),
            "mixed_precision": accelerator.mixed_precision,
            "recipe": args.recipe,
            "global_step": progress.global_step,
            "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
            "global_batch_size": global_batch,
            "images_seen": totals["images_seen"],
            "skipped_images": totals["skipped_images"],
            "final_metrics": final_metrics,
            "train_seconds": train_seconds,
            "steps_per_second": steps_run / train_seconds if train_seconds > 0 else None,
            "model_dir": str(output_dir / "model"),
            "pretraining_dir": str(output_dir / "pretraining"),
        }
        if accelerator.is_main_process:
            card.update(totals, global_step=progress.global_step, final_metrics=final_metrics)
            save_teacher(teacher, loss_fn, output_dir, config, card)
            if args.push_to_hub:
                summary["hub_url"] = push_outputs(output_dir, args.hub_model_id, args.hub_token, args.hub_private_repo)
            (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
            logger.info(f"Saved the teacher to {output_dir / 'model'} and {output_dir / 'pretraining'}.")
        accelerator.wait_for_everyone()
        return summary
    finally:
        accelerator.end_training()


def main(argv: list[str] | None = None) -> dict:
    return train(*parse_arguments(argv))


if __name__ == "__main__":
    main()
