"""EsViT pretraining: everything `run_pretraining.py` is built from. Never imported by the model.

Li et al., "Efficient Self-supervised Vision Transformers for Representation Learning" (ICLR 2022,
arXiv:2106.09785). One module per concept:

* `arguments`: the command-line / YAML arguments (model, data, training) and their parsing;
* `recipes`: named argument sets (the released ImageNet runs, small-image runs);
* `data`: unlabelled images through `datasets`, sharded once over the processes;
* `multicrop`: the 2 global + N local crop augmentation;
* `device_augment` / `device_crops`: the same augmentation batched on the accelerator, per sample;
* `centering`: the EMA centres of the teacher outputs (DINO's collapse-avoidance statistic);
* `loss`: teacher targets, region matching and the view + region cross-entropy;
* `koleo`: DINOv2's KoLeo regulariser of the pooled features (an option);
* `schedules`: learning rate, weight decay, teacher momentum and temperature per step;
* `optim`: parameter groups, clipping, last-layer freeze, the EMA teacher update;
* `pretrainer`: `EsViTPretrainer`, one training step as an object (`train_step`, `update_teacher`);
* `builders`: the accelerator, the data and the pretrainer built from the arguments;
* `checkpointing`: resumable checkpoints written and read without unpickling arbitrary objects;
* `monitoring`: metric windows, the collapse warning, the periodic k-NN monitor;
* `logs`: console logging above the progress bar, trackers, hardware defaults, the ETA;
* `pictures`: figures of the teacher in TensorBoard;
* `targets`: teacher normalisations (centring, Sinkhorn-Knopp);
* `hub`: saved model folders, model cards and the Hub upload.

Imports here are lazy, so `import esvit.training.loss` does not pull in accelerate or datasets.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EsViTLoss": "loss",
    "EsViTLossOutput": "loss",
    "EsViTPretrainer": "pretrainer",
    "PretrainingSchedules": "schedules",
    "build_schedules": "schedules",
    "MultiCropAugmentation": "multicrop",
    "get_recipe": "recipes",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
