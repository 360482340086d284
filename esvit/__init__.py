"""esvit: EsViT (Efficient Self-supervised Vision Transformers, ICLR 2022) for Hugging Face.

Importing the package registers the `esvit` model type with transformers' Auto classes, so that
`AutoConfig`, `AutoModel`, `AutoBackbone` and `AutoModelForPreTraining` load EsViT folders without
`trust_remote_code`. Training-only modules (loss, augmentation, schedules, data) are imported
explicitly (`from esvit.training.loss import EsViTLoss`), never from here.

The model classes below are loaded on first use. The registration imports torch and transformers
(several seconds); a command-line entry point that wants to answer `--help` and argument mistakes
first sets `ESVIT_DEFER_AUTO_REGISTRATION=1` before its first `esvit` import and calls
`register_auto_classes()` once the arguments are valid (`run_pretraining.py` does).
"""

from __future__ import annotations

import importlib
import os

__version__ = "0.1.0"

_EXPORTS = {
    "PRESETS": "configuration_esvit",
    "EsViTConfig": "configuration_esvit",
    "EsViTModel": "modeling_esvit",
    "EsViTBackbone": "modeling_esvit",
    "EsViTForPreTraining": "modeling_esvit",
    "EsViTModelOutput": "modeling_esvit",
    "EsViTPreTrainedModel": "modeling_esvit",
    "EsViTPreTrainingOutput": "modeling_esvit",
    "image_processor_for": "modeling_esvit",
}


def register_auto_classes() -> None:
    """Register the `esvit` model type with AutoConfig, AutoModel, AutoBackbone and
    AutoModelForPreTraining (idempotent)."""
    from transformers import AutoBackbone, AutoConfig, AutoModel, AutoModelForPreTraining

    from .configuration_esvit import EsViTConfig
    from .modeling_esvit import EsViTBackbone, EsViTForPreTraining, EsViTModel

    AutoConfig.register("esvit", EsViTConfig, exist_ok=True)
    AutoModel.register(EsViTConfig, EsViTModel, exist_ok=True)
    AutoBackbone.register(EsViTConfig, EsViTBackbone, exist_ok=True)
    AutoModelForPreTraining.register(EsViTConfig, EsViTForPreTraining, exist_ok=True)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if os.environ.get("ESVIT_DEFER_AUTO_REGISTRATION") != "1":
    register_auto_classes()

__all__ = [*_EXPORTS, "register_auto_classes"]
