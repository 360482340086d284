"""esvit: EsViT (Efficient Self-supervised Vision Transformers, ICLR 2022) for Hugging Face.

Importing the package registers the `esvit` model type with transformers' Auto classes, so that
`AutoConfig`, `AutoModel`, `AutoBackbone` and `AutoModelForPreTraining` load EsViT folders without
`trust_remote_code`. Training-only modules (loss, augmentation, schedules, data) are imported
explicitly (`from esvit.training.loss import EsViTLoss`), never from here.
"""

from transformers import AutoBackbone, AutoConfig, AutoModel, AutoModelForPreTraining

from .configuration_esvit import PRESETS, EsViTConfig
from .modeling_esvit import (
    EsViTBackbone,
    EsViTForPreTraining,
    EsViTModel,
    EsViTModelOutput,
    EsViTPreTrainedModel,
    EsViTPreTrainingOutput,
    image_processor_for,
)

__version__ = "0.1.0"

AutoConfig.register("esvit", EsViTConfig, exist_ok=True)
AutoModel.register(EsViTConfig, EsViTModel, exist_ok=True)
AutoBackbone.register(EsViTConfig, EsViTBackbone, exist_ok=True)
AutoModelForPreTraining.register(EsViTConfig, EsViTForPreTraining, exist_ok=True)

__all__ = [
    "PRESETS",
    "EsViTConfig",
    "EsViTModel",
    "EsViTBackbone",
    "EsViTForPreTraining",
    "EsViTModelOutput",
    "EsViTPreTrainedModel",
    "EsViTPreTrainingOutput",
    "image_processor_for",
]
