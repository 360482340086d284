"""Named hyper-parameter recipes for `run_pretraining.py --recipe NAME`.

A recipe is a flat mapping from argument names of `run_pretraining.py` (its model, data and
training dataclasses) to values. Precedence when the script parses its arguments:
dataclass defaults < recipe < YAML/JSON config file < command line.

The ImageNet recipes mirror the released EsViT runs (Li et al., ICLR 2022, arXiv:2106.09785) as
the original README launches them (`main_esvit.py --batch_size_per_gpu 32 --epochs 300
--teacher_temp 0.07 --warmup_epochs 10 --warmup_teacher_temp_epochs 30 --norm_last_layer false
--use_dense_prediction True`) plus the defaults of `main_esvit.py` for everything the command
does not set: lr 5e-4 per 256 images (linearly scaled by the global batch), min lr 1e-6, AdamW,
weight decay 0.04 -> 0.4, teacher momentum 0.996 -> 1, per-parameter gradient clipping at 3.0,
last layer frozen for 1 epoch, out_dim 65536, fp16 autocast, 2 global crops (224 px, scale
0.4-1) and 8 local crops (96 px, scale 0.05-0.4). The released runs used 16 GPUs, so a global
batch of 512 (`accelerate launch --num_processes 16 ...`); the learning rate follows whatever
global batch you launch with. The runs whose release says "continued_from0200_dense" trained
200 epochs with the view task only and then switched the region task on: train with
`--use_region_loss false`, then `--resume_from_checkpoint <that run's checkpoint>
--use_region_loss true` (the schedules continue where they were).
"""

from __future__ import annotations

import copy

_RELEASED = dict(
    config_overrides={"head_out_dim": 65536, "head_norm_last_layer": False},
    use_region_loss=True,
    per_device_train_batch_size=32,
    learning_rate=5e-4,
    min_lr=1e-6,
    num_train_epochs=300,
    warmup_epochs=10,
    weight_decay=0.04,
    weight_decay_end=0.4,
    momentum_teacher=0.996,
    warmup_teacher_temp=0.04,
    teacher_temp=0.07,
    warmup_teacher_temp_epochs=30,
    clip_grad=3.0,
    clip_grad_mode="per_param",
    freeze_last_layer_epochs=1,
    mixed_precision="fp16",
    global_crop_size=224,
    global_crops_scale=[0.4, 1.0],
    local_crop_size=96,
    num_local_crops=8,
    local_crops_scale=[0.05, 0.4],
    blur_probs=[1.0, 0.1, 0.5],
    dataloader_num_workers=10,
    checkpointing_steps=2500,
    checkpoints_total_limit=3,
    logging_steps=50,
)


def _released(preset: str, **changes) -> dict:
    return {**copy.deepcopy(_RELEASED), "model_preset": preset, **changes}


RECIPES: dict[str, dict] = {
    # The default of `python run_pretraining.py` without a data source: a micro Swin on the
    # embedded 500-image Fashion-MNIST sample, 64-px global / 32-px local crops, on CPU in about
    # a minute. It shows the whole pipeline working (loss falls, outputs load with AutoModel);
    # it is not a recipe for good features.
    "tiny-cpu-default": dict(
        model_preset="swin-micro",
        config_overrides={"image_size": 64, "window_size": 4},
        use_region_loss=True,
        per_device_train_batch_size=25,
        learning_rate=4e-3,
        min_lr=1e-5,
        num_train_epochs=4,
        warmup_epochs=1,
        weight_decay=0.04,
        weight_decay_end=0.1,
        momentum_teacher=0.99,
        warmup_teacher_temp=0.04,
        teacher_temp=0.06,
        warmup_teacher_temp_epochs=2,
        clip_grad=3.0,
        freeze_last_layer_epochs=1,
        global_crop_size=64,
        global_crops_scale=[0.4, 1.0],
        local_crop_size=32,
        num_local_crops=4,
        local_crops_scale=[0.1, 0.4],
        blur_probs=[0.0, 0.0, 0.0],  # 28-px images: blurring erases them
        dataloader_num_workers=0,
        logging_steps=5,
    ),
    # Fashion-MNIST (28-px grey images) on a 2-core CPU in ~11 minutes: a 3-stage Swin with 2x2
    # patches (28 px -> 14x14 tokens), 2 x 28-px + 4 x 14-px crops, batch 64, 700 steps, teacher
    # momentum 0.99 (the teacher must move within a few hundred steps), out_dim 256. Used by
    # benchmarks/fashion_mnist_quality.py; its measured result is in the README.
    "fashion-mnist-cpu": dict(
        model_preset="swin-micro",
        config_overrides={
            "image_size": 28,
            "hidden_sizes": [32, 64, 128],
            "depths": [2, 2, 2],
            "num_heads": [1, 2, 4],
            "patch_sizes": [2, 2, 2],
            "window_size": 7,
            "drop_path_rate": 0.0,
            "head_hidden_dim": 256,
            "head_bottleneck_dim": 64,
            "head_out_dim": 256,
            "head_norm_last_layer": True,
        },
        use_region_loss=True,
        per_device_train_batch_size=64,
        max_train_steps=700,
        learning_rate=0.003,
        min_lr=1e-05,
        warmup_steps=30,
        weight_decay=0.04,
        weight_decay_end=0.1,
        momentum_teacher=0.99,
        warmup_teacher_temp=0.04,
        teacher_temp=0.04,
        warmup_teacher_temp_steps=0,
        student_temp=0.1,
        center_momentum=0.9,
        clip_grad=3.0,
        freeze_last_layer_steps=0,
        global_crop_size=28,
        global_crops_scale=[0.4, 1.0],
        local_crop_size=14,
        num_local_crops=4,
        local_crops_scale=[0.1, 0.4],
        blur_probs=[0.0, 0.0, 0.0],
        dataloader_num_workers=1,
        logging_steps=25,
        report_to="none",
        collapse_patience_steps=0,
    ),
    # A user's own folder of small images (28-64 px) on a CPU: the `swin-micro-p2` model (three
    # stages, 2-px patches) on 28-px crops, no local crops (14-px crops of 28-px images are mostly
    # flat patches) and a BatchNorm view head, the two levers that made this scale learn; epochs
    # are counted over the user's data. The default of `run_pretraining.py --train_dir DIR` on a
    # machine without a GPU.
    "small-images-cpu": dict(
        model_preset="swin-micro-p2",
        config_overrides={"head_use_bn": True, "head_norm_last_layer": True},
        use_region_loss=True,
        per_device_train_batch_size=64,
        num_train_epochs=30,
        learning_rate=0.003,
        min_lr=1e-05,
        warmup_epochs=1,
        weight_decay=0.04,
        weight_decay_end=0.1,
        momentum_teacher=0.99,
        warmup_teacher_temp=0.04,
        teacher_temp=0.04,
        warmup_teacher_temp_epochs=0,
        freeze_last_layer_epochs=0,
        global_crop_size=28,
        global_crops_scale=[0.4, 1.0],
        num_local_crops=0,
        local_crop_size=14,
        blur_probs=[0.0, 0.0, 0.0],
        dataloader_num_workers=1,
        logging_steps=25,
        collapse_patience_steps=100,
    ),
    # Released EsViT runs (ImageNet-1k, 16 GPUs x 32 images, view + region tasks).
    "esvit-swin-tiny-imagenet": _released("swin-tiny-w7"),
    "esvit-swin-small-imagenet": _released("swin-small-w7"),
    # Released after 200 view-only epochs + 100 with the region task (see the module docstring).
    "esvit-swin-base-imagenet": _released("swin-base-w7"),
    "esvit-swin-tiny-w14-imagenet": _released("swin-tiny-w14"),
    "esvit-vil-2262-imagenet": _released("vil-2262"),
    "esvit-cvt-s1-imagenet": _released("cvt-s1"),
}

DEFAULT_RECIPE = "tiny-cpu-default"


def get_recipe(name: str) -> dict:
    """A copy of the recipe `name` (safe to modify)."""
    if name not in RECIPES:
        from .arguments import did_you_mean

        raise ValueError(
            f"unknown recipe {name!r}{did_you_mean(name, RECIPES)}; known recipes: {', '.join(sorted(RECIPES))}."
        )
    return copy.deepcopy(RECIPES[name])


__all__ = ["DEFAULT_RECIPE", "RECIPES", "get_recipe"]
