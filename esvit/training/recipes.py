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
from pathlib import Path

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


# The embedded 500-image Fashion-MNIST sample (esvit/data), computed here rather than imported
# from `training.data` so that reading a recipe needs no torch / datasets import.
EMBEDDED_SAMPLE = str(Path(__file__).resolve().parents[1] / "data" / "fashion_mnist_500.parquet")

# The DINO heads of the small recipes: the micro presets' 256/64/256 heads with BatchNorm in the
# MLP (`head_use_bn`, an option of the original DINO head): with it the view task learned on
# Fashion-MNIST (+6.2 k-NN points at 38.4k images) where the BN-free head stayed near uniform.
_SMALL_HEADS = {"head_use_bn": True}

# Fashion-MNIST (28-px grey images) on one core of a shared 2-core CPU: a 3-stage Swin with 2x2
# patches (28 px -> 14x14 tokens), 2 x 28-px global crops and no local crops, the BatchNorm head,
# batch 64, 600 steps (38.4k images, ~8 CPU-min unshared), teacher momentum 0.99 (the teacher must
# move within a few hundred steps), out_dim 256. Against the former recipe (4 local crops, no BN:
# +0.8 k-NN points above random weights at 44.8k images) the two levers gave +5.6 at 38.4k. The
# view term at full weight with the region term at half (EsViT's 0.5 / 0.5 halves the view task's
# gradient: 70.5% -> 76.5% k-NN) and KoLeo 0.1 (-> 79.1%, above DINO + KoLeo's 78.3%) complete it;
# see benchmarks/results/fashion_mnist_cpu.md, section 3.
_SMALL_IMAGES = dict(
    # the preset is exactly that Swin (28 px, widths 32-64-128, depths 2-2-2, 2-px patches, window 7)
    model_preset="swin-micro-p2",
    config_overrides={"head_norm_last_layer": True, **_SMALL_HEADS},
    use_region_loss=True,
    view_loss_weight=1.0,
    region_loss_weight=0.5,
    koleo_loss_weight=0.1,
    per_device_train_batch_size=64,
    max_train_steps=600,
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
    num_local_crops=0,
    local_crops_scale=[0.1, 0.4],
    blur_probs=[0.0, 0.0, 0.0],
    dataloader_num_workers=1,
    logging_steps=25,
    report_to="none",
    collapse_patience_steps=0,
)

RECIPES: dict[str, dict] = {
    # The default of `python run_pretraining.py` without a data source: the embedded 500-image
    # Fashion-MNIST sample, on CPU in about a minute (200 steps of 25 images, 10 epochs, ~4
    # steps/s on one core), with the k-NN monitor (leave-one-out over the same 500 labelled
    # images), so the run ends by comparing its features with the random initial weights. A
    # 4-stage CvT at 28 px (the last stage keeps the 4x4 map: stride 1), two 28-px global crops
    # and no local crops, view task only (the region task tripled the step time of the CvT on
    # CPU), plus the KoLeo regulariser (weight 0.5) on the student's pooled features: without it
    # the view task alone moved the k-NN by -1.2 / +1.2 / +1.6 points against the random weights
    # (seeds 0 / 1 / 2; higher learning rates lost more); with it, 60.4 -> 68.2 / 59.8 -> 67.2 /
    # 58.8 -> 64.6 (+7.8 / +7.4 / +5.8), and 70.0 (seed 0) after 3x the epochs. Measured:
    # benchmarks/results/default_run_levers.md.
    "tiny-cpu-default": dict(
        # the small-image CvT (convolutional embeddings and depthwise-conv q/k/v projections: the
        # inductive bias a tiny attention-only Swin lacks), made 4-stage: a last stride-1 stage at 4 x 4
        model_preset="cvt-micro-p2",
        config_overrides={
            "hidden_sizes": [32, 64, 128, 128],
            "depths": [1, 1, 1, 1],
            "num_heads": [1, 2, 4, 4],
            "patch_sizes": [3, 3, 3, 3],
            "patch_strides": [2, 2, 2, 1],
            "patch_padding": [1, 1, 1, 1],
            **_SMALL_HEADS,
        },
        use_region_loss=False,
        per_device_train_batch_size=25,
        learning_rate=5e-3,
        min_lr=1e-5,
        num_train_epochs=10,
        warmup_epochs=1,
        weight_decay=0.04,
        weight_decay_end=0.1,
        momentum_teacher=0.99,
        warmup_teacher_temp=0.04,
        teacher_temp=0.04,
        warmup_teacher_temp_epochs=0,
        koleo_loss_weight=0.5,
        clip_grad=3.0,
        freeze_last_layer_epochs=0,
        global_crop_size=28,
        global_crops_scale=[0.4, 1.0],
        local_crop_size=14,
        num_local_crops=0,
        local_crops_scale=[0.1, 0.4],
        blur_probs=[0.0, 0.0, 0.0],  # 28-px images: blurring erases them
        dataloader_num_workers=0,
        logging_steps=10,
        eval_dataset_name=EMBEDDED_SAMPLE,
    ),
    # Fashion-MNIST: used by benchmarks/fashion_mnist_quality.py (see _SMALL_IMAGES above).
    "fashion-mnist-cpu": copy.deepcopy(_SMALL_IMAGES),
    # A user's own folder of small images (about 28-64 px; `--train_dir my_images`, and
    # `--eval_dir my_labelled_class_folders` for the k-NN monitor): the measured Fashion-MNIST
    # recipe above (3-stage Swin at 28 px, no local crops, BatchNorm head, momentum 0.99,
    # out_dim 256, view 1.0 + region 0.5 + KoLeo 0.1), without its benchmark-only settings. The random crops
    # resize any image to 28 px; for larger images raise image_size and global_crop_size together
    # (a multiple of 4 whose token map, image_size / 2, suits window_size). Give more steps for
    # more data with --max_train_steps.
    "small-images-cpu": {k: v for k, v in copy.deepcopy(_SMALL_IMAGES).items() if k != "report_to"},
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


__all__ = ["DEFAULT_RECIPE", "EMBEDDED_SAMPLE", "RECIPES", "get_recipe"]
