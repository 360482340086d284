"""Saved folders of a pretraining run, their model cards, and the Hub upload.

`save_teacher` writes the two folders a run produces: `model/` (`EsViTModel`, the teacher
backbone, what `AutoModel.from_pretrained` and `pipeline("image-feature-extraction")` load) and
`pretraining/` (`EsViTForPreTraining`: backbone + both heads + the loss centres, what
`--init_from` continues). The cards are built with `huggingface_hub.ModelCard` / `ModelCardData`
from the effective values of the run (the peak learning rate after linear scaling, the real
global batch), name no local paths, and carry the licence, the paper and its BibTeX.
"""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors.torch import save_file

from .loss import LOSS_STATE_FILE

logger = logging.getLogger(__name__)

CITATION = """@inproceedings{li2022esvit,
  title     = {Efficient Self-supervised Vision Transformers for Representation Learning},
  author    = {Li, Chunyuan and Yang, Jianwei and Zhang, Pengchuan and Gao, Mei and Xiao, Bin and
               Dai, Xiyang and Yuan, Lu and Gao, Jianfeng},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2022},
  url       = {https://arxiv.org/abs/2106.09785}
}"""

TAGS = ["esvit", "self-supervised-learning", "image-feature-extraction", "vision"]


def save_teacher(teacher, loss_fn, folder: Path, student_config, card: dict) -> None:
    """Write `folder/model` and `folder/pretraining`, each with an image-processor config and a card.

    The teacher runs without drop-path; the saved config keeps the trained architecture's rate.
    """
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
    model_card(card, with_heads=False).save(folder / "model" / "README.md")
    model_card(card, with_heads=True).save(folder / "pretraining" / "README.md")


def model_card(info: dict, with_heads: bool):
    """A `huggingface_hub.ModelCard` describing what was trained, on what, how, and how to use it."""
    from huggingface_hub import ModelCard, ModelCardData

    config = info["config"]
    name = info.get("model_name") or f"esvit-{info['preset']}"
    data = ModelCardData(
        library_name="transformers",
        license="mit",
        pipeline_tag="image-feature-extraction",
        tags=TAGS,
        datasets=info.get("datasets") or None,
        model_name=name,
    )
    what = (
        "the EsViT backbone, its view-level head (`head`) and region-level head (`head_dense`), and the "
        f"loss centres (`{LOSS_STATE_FILE}`)"
        if with_heads
        else "the EsViT backbone (the EMA teacher)"
    )
    levels = "view level (DINO) and region level" if info["region"] else "view level (DINO)"
    hparams = "\n".join(f"| `{k}` | `{v}` |" for k, v in sorted(info["hyperparameters"].items()))
    loss = info.get("final_metrics") or {}
    loss_text = ", ".join(f"{k} {v:.4f}" for k, v in loss.items() if isinstance(v, float)) or "not logged"
    epochs = f"{info['global_step'] / info['steps_per_epoch']:.2f} epochs" if info["steps_per_epoch"] else "a stream"
    knn = info.get("knn") or {}
    knn_text = (
        f"- k-NN monitor (k = {knn['knn_k']}, T = 0.07, teacher pooled feature, {knn['knn_data']}): "
        f"{knn['knn_top1_initial']:.2f}% before training, {knn['knn_top1_final']:.2f}% at the end, best "
        f"{knn['knn_top1_best']:.2f}% at step {knn['knn_best_step']}\n"
        if knn
        else ""
    )
    if with_heads:
        use = (
            "import esvit  # registers the esvit model type with transformers\n"
            "from esvit import EsViTForPreTraining\n"
            'model = EsViTForPreTraining.from_pretrained("path/or/hub-id/pretraining")'
        )
    else:
        use = (
            "from PIL import Image\n"
            "from transformers import AutoImageProcessor, AutoModel, pipeline\n\n"
            'repo = "path/or/hub-id"  # without `pip install esvit`, add trust_remote_code=True\n'
            "processor = AutoImageProcessor.from_pretrained(repo)\n"
            "model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()\n"
            'pixel_values = processor(Image.open("photo.jpg"), return_tensors="pt")["pixel_values"]\n'
            "features = model(pixel_values).pooler_output  # [1, C] view-level feature\n\n"
            'extractor = pipeline("image-feature-extraction", model=repo, trust_remote_code=True)'
        )
    content = f"""---
{data.to_yaml()}
---

# {name} ({"backbone + pretraining heads" if with_heads else "backbone"})

This repository holds {what}, trained with EsViT (Li et al., "Efficient Self-supervised Vision
Transformers for Representation Learning", ICLR 2022, [arXiv:2106.09785](https://arxiv.org/abs/2106.09785)):
self-distillation of a student into an exponential-moving-average teacher at the {levels}.
The weights are the teacher's.

## How to use

```python
{use}
```

The image processor saved here resizes, centre-crops to {config["image_size"]} px and applies the
ImageNet normalisation.

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
- peak learning rate {info["peak_lr"]:.3g} (the base rate {info["hyperparameters"]["learning_rate"]} per 256
  images, scaled linearly to the global batch)
- tasks: view-level{" + region-level matching" if info["region"] else " only (DINO)"}
- final training metrics (mean of the last logging window): {loss_text}
- {info["images_seen"]} images trained on, {info["skipped_images"]} skipped as undecodable,
  {info.get("nonfinite_steps", 0)} optimizer steps skipped as non-finite
{knn_text}
| argument | value |
|---|---|
{hparams}

## Citation

```bibtex
{CITATION}
```

Licence: MIT, as the original EsViT code.
"""
    return ModelCard(content)


def card_info(pretrainer, model_args, data_args, args, *, step, steps_per_epoch, final_metrics, totals, knn) -> dict:
    """What `model_card` describes, from the run's effective values (peak lr after scaling, the
    real global batch), without local paths."""
    config, teacher = pretrainer.config, pretrainer.teacher
    return {
        "config": config.to_dict(),
        "region": model_args.use_region_loss,
        "preset": "continued" if model_args.init_from else model_args.model_preset,
        "num_parameters": sum(p.numel() for p in teacher.esvit.parameters()),
        "data": data_args.describe_source(public=True),
        "datasets": data_args.hub_dataset_ids(),
        "steps_per_epoch": steps_per_epoch,
        "global_batch_size": pretrainer.global_batch_size,
        "num_processes": pretrainer.accelerator.num_processes,
        "per_device_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "peak_lr": float(pretrainer.plan.schedules.lr.max()),
        "hyperparameters": tracker_config(model_args, data_args, args),
        "global_step": step,
        "final_metrics": final_metrics,
        "nonfinite_steps": pretrainer.nonfinite_steps,
        "knn": knn.summary() if knn else None,
        "model_name": args.hub_model_id,
        **totals,
    }


def create_hub_repo(repo_id: str, token: str | None, private: bool, api=None) -> str:
    """Create (or find) the Hub repository before training, so that a wrong id or token fails in
    seconds rather than after the run; returns its URL."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    return str(api.create_repo(repo_id, private=private, exist_ok=True))


def push_outputs(output_dir: Path, repo_id: str, token: str | None, api=None) -> str:
    """Upload `model/` as the repo root (AutoModel loads the repo id) and `pretraining/` beside it."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.upload_folder(repo_id=repo_id, folder_path=str(output_dir / "model"), commit_message="EsViT backbone")
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir / "pretraining"),
        path_in_repo="pretraining",
        commit_message="EsViT backbone with pretraining heads",
    )
    return f"https://huggingface.co/{repo_id}"


def tracker_config(*dataclasses_) -> dict:
    """All arguments as scalars (for trackers and model cards), without secrets or local paths."""
    from dataclasses import asdict

    hidden = {
        "hub_token",
        "output_dir",
        "train_dir",
        "train_files",
        "dataset_from_disk",
        "dataset_cache_dir",
        "config",
        "eval_dir",
    }
    flat = {}
    for obj in dataclasses_:
        for key, value in asdict(obj).items():
            if key in hidden:
                continue
            flat[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


__all__ = ["CITATION", "card_info", "create_hub_repo", "model_card", "push_outputs", "save_teacher", "tracker_config"]
