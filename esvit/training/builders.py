"""What `run_pretraining.py` builds before its loop: the accelerator, the data, the networks.

Each function turns parsed arguments (`arguments`) into ready objects, so the script reads
parse -> build -> loop:

* `make_accelerator`: `accelerate.Accelerator` with mixed precision (bf16 by default on a GPU
  that has it), gradient accumulation, trackers, the seedable sampler and the collective timeout;
* `build_data`: the images (`data.load_pretraining_images`), the multi-crop collator and this
  process's loader, with the epoch length where the source has one;
* `build_pretrainer`: student, EMA teacher (the same network without drop-path, never given
  gradients), loss, AdamW, schedules, wrapped in an `EsViTPretrainer`.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs
from safetensors.torch import load_file

from ..modeling_esvit import EsViTForPreTraining
from .arguments import DataArguments, ModelArguments, PretrainingArguments
from .device_augment import DevicePhotometricAugmentation, device_recipe_from
from .logs import default_mixed_precision, trackers, worker_count
from .loss import LOSS_STATE_FILE, EsViTLoss
from .multicrop import MultiCropAugmentation
from .optim import build_optimizer, get_param_groups
from .pretrainer import EsViTPretrainer
from .schedules import plan_training

if TYPE_CHECKING:
    from .data import MultiCropCollator, PretrainingLoader

logger = logging.getLogger(__name__)


def make_accelerator(args: PretrainingArguments) -> Accelerator:
    return Accelerator(
        cpu=args.cpu,
        mixed_precision=default_mixed_precision(args),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers(args.report_to),
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        dynamo_backend="inductor" if args.torch_compile else None,
        kwargs_handlers=[
            # View-only training freezes the region head, so every trainable parameter gets a gradient.
            DistributedDataParallelKwargs(find_unused_parameters=False),
            InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout)),
        ],
    )


@dataclass
class PretrainingData:
    """The images, their collate function and this process's loader.

    Attributes:
        batches_per_epoch / steps_per_epoch: per process and per optimizer step; None for a
            stream of unknown length.
    """

    dataset: object
    collator: MultiCropCollator
    loader: PretrainingLoader
    batches_per_epoch: int | None
    steps_per_epoch: int | None
    augmentation: MultiCropAugmentation  # the whole recipe (the pictures use it)
    device_augment: DevicePhotometricAugmentation | None = None  # with --augment_on_device

    def crops_on_device(self, crops: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
        """The batch's crops as the step takes them: with `--augment_on_device` the uint8 crops get
        their photometric half here, from a generator seeded by `seed` (a function of the data
        position, so a resumed run draws the same); otherwise as they came."""
        if self.device_augment is None:
            return crops
        generator = torch.Generator(device=crops[0].device).manual_seed(seed)
        return self.device_augment(crops, generator=generator)


def build_data(data_args: DataArguments, args: PretrainingArguments, accelerator: Accelerator) -> PretrainingData:
    # `datasets` is imported for the data only: `build_pretrainer` works without it (on images
    # already in memory, as benchmarks/fashion_mnist_gpu.py trains).
    from .data import (
        MultiCropCollator,
        build_augmentation,
        build_pretraining_loader,
        load_pretraining_images,
        min_side_for_crops,
    )

    with accelerator.main_process_first():
        dataset = load_pretraining_images(data_args)
    augmentation = build_augmentation(data_args)
    crop_only, device_augment = device_recipe_from(augmentation) if data_args.augment_on_device else (None, None)
    collator = MultiCropCollator(
        crop_only or augmentation,
        seed=args.seed,
        max_pixels=data_args.max_image_pixels,
        min_side=min_side_for_crops(data_args),
    )
    loader = build_pretraining_loader(
        dataset,
        accelerator=accelerator,
        collator=collator,
        batch_size=args.per_device_train_batch_size,
        num_workers=worker_count(data_args.dataloader_num_workers, accelerator),
        seed=args.seed,
        shuffle_buffer_size=data_args.shuffle_buffer_size,
    )
    batches = loader.known_batches_per_epoch(data_args, args.per_device_train_batch_size, accelerator)
    steps = math.ceil(batches / args.gradient_accumulation_steps) if batches else None
    if device_augment is not None:
        device_augment = device_augment.to(accelerator.device)
    return PretrainingData(dataset, collator, loader, batches, steps, augmentation, device_augment)


def build_pretrainer(
    model_args: ModelArguments,
    data_args: DataArguments,
    args: PretrainingArguments,
    accelerator: Accelerator,
    steps_per_epoch: int | None,
) -> EsViTPretrainer:
    """Student, teacher, loss, optimizer and schedules of the run, as one `EsViTPretrainer`."""
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
    if not model_args.use_region_loss:  # DINO's view task: the region head is neither run nor trained
        student.head_dense.requires_grad_(False)
    teacher_config = copy.deepcopy(config)
    teacher_config.drop_path_rate = 0.0
    teacher = EsViTForPreTraining(teacher_config)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    has_batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in student.modules())
    if has_batchnorm and accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = torch.nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    # Both stay in train mode: BatchNorm heads / CvT use batch statistics, as in the original.
    student.train()
    teacher.train().to(accelerator.device)

    loss_fn = EsViTLoss(
        out_dim=config.head_out_dim,
        num_global_crops=2,
        student_temp=args.student_temp,
        center_momentum=args.center_momentum,
        use_region_loss=model_args.use_region_loss,
        teacher_normalization=args.teacher_normalization,
        view_weight=args.view_loss_weight,
        region_weight=args.region_loss_weight,
    ).to(accelerator.device)
    centres = Path(model_args.init_from or "") / LOSS_STATE_FILE
    if model_args.init_from and centres.is_file():
        loss_fn.load_state_dict(load_file(str(centres)))
    optimizer = build_optimizer(get_param_groups(student), args.fused_optimizer, accelerator.device)
    student, optimizer = accelerator.prepare(student, optimizer)
    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    return EsViTPretrainer(
        accelerator,
        student,
        teacher,
        loss_fn,
        optimizer,
        plan_training(args, steps_per_epoch, global_batch),
        clip_grad=args.clip_grad,
        clip_grad_mode=args.clip_grad_mode,
        max_consecutive_nonfinite=args.max_consecutive_nonfinite,
        teacher_forward=torch.compile(teacher) if args.torch_compile else teacher,
        global_batch_size=global_batch,
        koleo_weight=args.koleo_loss_weight,
    )


__all__ = ["PretrainingData", "build_data", "build_pretrainer", "make_accelerator"]
