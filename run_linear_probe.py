#!/usr/bin/env python
"""Evaluate frozen EsViT features: weighted k-NN and linear probing.

The protocols of the paper (Li et al., "Efficient Self-supervised Vision Transformers for
Representation Learning", ICLR 2022, sec. 5), which follow DINO (Caron et al., ICCV 2021):

* ``knn``: weighted k-NN (T = 0.07) on L2-normalised pooled features of the centre-crop view.
* ``linear``: the full linear probe: a linear layer on the concatenated token-averaged outputs of
  the last 4 blocks, trained with RandomResizedCrop + flip through the frozen backbone (SGD, momentum
  0.9, no weight decay, lr per 256 images, cosine over the epochs). Slow: every epoch runs the
  backbone over the training split.
* ``fast_linear``: the same probe trained on cached centre-crop features, with the learning rate
  chosen by a sweep on a held-out part of the training split. Minutes instead of GPU-days.

Examples:

    # one process
    python run_linear_probe.py --model_name_or_path path/to/esvit --dataset_name imagenet-1k \\
        --protocol knn,fast_linear --output_dir eval_out

    # several GPUs: features are extracted in parallel and gathered in dataset order
    accelerate launch run_linear_probe.py --model_name_or_path ... --protocol all --output_dir ...

Writes ``results.json`` to ``--output_dir``; when the model is a local folder, its model card
(README.md) gets ``model-index`` entries stating each protocol, and ``--push_to_hub`` uploads it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import AutoModel, HfArgumentParser

import esvit  # noqa: F401  (registers the esvit model type with AutoModel)
from esvit.evaluation.data import (
    LabelledImageDataset,
    build_eval_transform,
    build_train_transform,
    collate_labelled,
    load_labelled_split,
)
from esvit.evaluation.features import FEATURE_KINDS, extract_features
from esvit.evaluation.knn import knn_classify
from esvit.evaluation.linear_probe import fast_linear_probe, train_linear_probe

logger = logging.getLogger(__name__)

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
    eval_split: str | None = _arg(None, "Default: the first of validation, val, test.")
    image_column: str | None = _arg(None, "Default: guessed (image, img, ...).")
    label_column: str | None = _arg(None, "Default: guessed (label, labels, ...).")
    max_train_samples: int | None = _arg(None, "Keep only the first rows (quick runs).")
    max_eval_samples: int | None = _arg(None)
    image_size: int | None = _arg(None, "Crop size; default: the model config's image_size.")
    resize_size: int | None = _arg(None, "Short side before the centre crop; default image_size * 256 / 224.")
    cache_dir: str | None = _arg(None)
    dataloader_num_workers: int = _arg(4)


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
def _eval_results(results: dict, dataset_type: str, dataset_name: str, split: str) -> list:
    from huggingface_hub import EvalResult

    common = dict(
        task_type="image-classification",
        task_name="Image Classification",
        dataset_type=dataset_type,
        dataset_name=dataset_name,
        dataset_split=split,
        metric_type="accuracy",
    )
    entries = []
    if "knn" in results:
        knn = results["knn"]
        for k, scores in knn["results"].items():
            entries.append(
                EvalResult(
                    **common,
                    metric_name=f"k-NN top-1 (k={k}, T={knn['temperature']}, {knn['features']} features)",
                    metric_value=round(scores["top1"], 2),
                    metric_args={
                        "protocol": "weighted k-NN",
                        "k": int(k),
                        "temperature": knn["temperature"],
                        "features": knn["features"],
                    },
                )
            )
    if "fast_linear" in results:
        fast = results["fast_linear"]
        entries.append(
            EvalResult(
                **common,
                metric_name=f"Linear probe top-1 (cached centre-crop features, {fast['features_description']}, lr sweep)",
                metric_value=round(fast["top1"], 2),
                metric_args={
                    "protocol": "linear probe on cached features",
                    "epochs": fast["epochs"],
                    "lr": fast["best_lr"],
                    "features": fast["features_description"],
                },
            )
        )
    if "linear" in results:
        lin = results["linear"]
        entries.append(
            EvalResult(
                **common,
                metric_name=f"Linear probe top-1 (full protocol, {lin['epochs']} epochs, {lin['features_description']})",
                metric_value=round(lin["top1"], 2),
                metric_args={
                    "protocol": "linear probe, RandomResizedCrop+flip",
                    "epochs": lin["epochs"],
                    "lr": lin["lr"],
                    "features": lin["features_description"],
                },
            )
        )
    return entries


def update_model_card(
    card_path: str | None,
    repo_id: str | None,
    results: dict,
    data_args: DataArguments,
    probe_args: ProbeArguments,
    model_name: str,
):
    """Merge this run's results into the card's model-index (same dataset/split/metric replaced)."""
    from huggingface_hub import ModelCard, ModelCardData

    if card_path is not None and os.path.isfile(card_path):
        card = ModelCard.load(card_path)
    elif card_path is None and repo_id is not None:
        card = ModelCard.load(repo_id, token=probe_args.hub_token)
    else:
        card = ModelCard(
            f"---\n{ModelCardData().to_yaml()}\n---\n\n# {model_name}\n\nAn EsViT backbone "
            "(Li et al., ICLR 2022, arXiv:2106.09785).\n"
        )
    dataset_type = data_args.dataset_name or "local files"
    if os.path.exists(dataset_type):  # a local folder: its path means nothing to a card reader
        dataset_type = os.path.basename(os.path.normpath(dataset_type))
    dataset_name = probe_args.dataset_display_name or dataset_type
    new = _eval_results(results, dataset_type, dataset_name, results["eval_split"])
    key = lambda r: (r.dataset_type, r.dataset_split, r.metric_name)  # noqa: E731
    replaced = {key(r) for r in new}
    kept = [r for r in (card.data.eval_results or []) if key(r) not in replaced]
    card.data.eval_results = kept + new
    if not card.data.model_name:
        card.data.model_name = model_name
    return card


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, ProbeArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, probe_args = parser.parse_json_file(os.path.abspath(argv[0]))
    else:
        model_args, data_args, probe_args = parser.parse_args_into_dataclasses(args=argv)
    protocols = parse_protocols(probe_args.protocol)
    for name in ("knn_features", "linear_features"):
        if getattr(probe_args, name) not in FEATURE_KINDS:
            raise ValueError(f"--{name} must be one of {FEATURE_KINDS}, got {getattr(probe_args, name)!r}.")

    accelerator = Accelerator(
        cpu=probe_args.cpu,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=probe_args.process_group_timeout_minutes))],
    )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
    )
    set_seed(probe_args.seed)
    timings: dict[str, float] = {}

    # ---------------------------------------------------------------- model
    model = AutoModel.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code, revision=model_args.revision
    )
    model.requires_grad_(False).eval().to(accelerator.device)
    image_size = data_args.image_size or getattr(model.config, "image_size", 224)

    # ----------------------------------------------------------------- data
    split_kwargs = dict(
        config_name=data_args.dataset_config_name,
        image_column=data_args.image_column,
        label_column=data_args.label_column,
        cache_dir=data_args.cache_dir,
    )
    data_files = None
    if data_args.train_file or data_args.eval_file:
        if not (data_args.train_file and data_args.eval_file):
            raise ValueError("give both --train_file and --eval_file.")
        data_files = {"train": data_args.train_file, "eval": data_args.eval_file}
    with accelerator.main_process_first():  # the main process builds any `datasets` cache first
        train_split = load_labelled_split(
            data_args.dataset_name,
            "train" if data_files else data_args.train_split,
            data_files=data_files,
            max_samples=data_args.max_train_samples,
            **split_kwargs,
        )
        eval_candidates = (
            ["eval"]
            if data_files
            else ([data_args.eval_split] if data_args.eval_split else ["validation", "val", "test"])
        )
        eval_split = load_labelled_split(
            data_args.dataset_name,
            eval_candidates,
            data_files=data_files,
            class_names=train_split.class_names,
            max_samples=data_args.max_eval_samples,
            **split_kwargs,
        )
    num_classes = train_split.num_classes
    accelerator.print(
        f"{len(train_split)} train / {len(eval_split)} eval images, {num_classes} classes, "
        f"{image_size}-px crops, {accelerator.num_processes} process(es)"
    )

    eval_transform = build_eval_transform(image_size, data_args.resize_size)

    def loader(split, transform, shuffle: bool) -> DataLoader:
        return DataLoader(
            LabelledImageDataset(split, transform),
            batch_size=probe_args.per_device_batch_size,
            shuffle=shuffle,
            num_workers=data_args.dataloader_num_workers,
            collate_fn=collate_labelled,
        )

    results: dict = {
        "model": model_args.model_name_or_path,
        "dataset": data_args.dataset_name or data_files,
        "train_split": data_args.train_split,
        "eval_split": eval_split.name,
        "num_train": len(train_split),
        "num_eval": len(eval_split),
        "num_classes": num_classes,
        "class_names": train_split.class_names,
        "image_size": image_size,
        "num_processes": accelerator.num_processes,
        "protocols": protocols,
    }
    n = probe_args.n_last_blocks
    describe = {"pooled": "pooled features", "n_last_blocks": f"{n} last blocks"}

    # ----------------------------------------------------- cached features
    kinds = set()
    if "knn" in protocols:
        kinds.add(probe_args.knn_features)
    if "fast_linear" in protocols:
        kinds.add(probe_args.linear_features)
    kinds = sorted(kinds)
    if kinds:
        start = time.perf_counter()
        train_loader, eval_loader = accelerator.prepare(
            loader(train_split, eval_transform, False), loader(eval_split, eval_transform, False)
        )
        train_feats, train_labels = extract_features(model, train_loader, accelerator, kinds, n, desc="train features")
        eval_feats, eval_labels = extract_features(model, eval_loader, accelerator, kinds, n, desc="eval features")
        timings["extraction_s"] = time.perf_counter() - start
        if probe_args.save_features and accelerator.is_main_process:
            from safetensors.torch import save_file

            os.makedirs(probe_args.output_dir, exist_ok=True)
            for name, feats, labels in (("train", train_feats, train_labels), ("eval", eval_feats, eval_labels)):
                save_file(
                    {**{k: v.contiguous() for k, v in feats.items()}, "labels": labels},
                    os.path.join(probe_args.output_dir, f"features_{name}.safetensors"),
                )
        # Every process holds all features and runs the same (cheap, seeded) computation below, so no
        # process sits in a collective while another one trains.
        device = accelerator.device
        train_feats = {k: v.to(device) for k, v in train_feats.items()}
        eval_feats = {k: v.to(device) for k, v in eval_feats.items()}

    # ------------------------------------------------------------------ k-NN
    if "knn" in protocols:
        start = time.perf_counter()
        ks = [k for k in probe_args.nb_knn if k <= len(train_split)]
        if len(ks) < len(probe_args.nb_knn):
            logger.warning(
                "k-NN: skipping k > %d (the number of training images): %s",
                len(train_split),
                [k for k in probe_args.nb_knn if k > len(train_split)],
            )
        if not ks:
            raise ValueError(f"every k in --nb_knn exceeds the {len(train_split)} training images.")
        knn = knn_classify(
            train_feats[probe_args.knn_features],
            train_labels.to(device),
            eval_feats[probe_args.knn_features],
            eval_labels.to(device),
            num_classes,
            ks=ks,
            temperature=probe_args.temperature,
            batch_size=probe_args.knn_batch_size,
        )
        results["knn"] = {
            "features": probe_args.knn_features,
            "temperature": probe_args.temperature,
            "results": {str(k): v for k, v in knn.items()},
        }
        timings["knn_s"] = time.perf_counter() - start
        for k, v in knn.items():
            accelerator.print(f"{k}-NN: " + ", ".join(f"{m} {a:.2f}%" for m, a in v.items()))

    # ------------------------------------------------------- fast linear probe
    if "fast_linear" in protocols:
        start = time.perf_counter()
        fast = fast_linear_probe(
            train_feats[probe_args.linear_features],
            train_labels.to(device),
            eval_feats[probe_args.linear_features],
            eval_labels.to(device),
            num_classes,
            lrs=probe_args.fast_lrs,
            epochs=probe_args.fast_epochs,
            batch_size=probe_args.fast_batch_size,
            holdout_fraction=probe_args.holdout_fraction,
            seed=probe_args.seed,
            show_progress=accelerator.is_local_main_process,
        )
        results["fast_linear"] = {
            **fast.test,
            "best_lr": fast.best_lr,
            "sweep_heldout_top1": {str(k): v for k, v in fast.sweep.items()},
            "epochs": probe_args.fast_epochs,
            "batch_size": probe_args.fast_batch_size,
            "holdout_fraction": probe_args.holdout_fraction,
            "features": probe_args.linear_features,
            "features_description": describe[probe_args.linear_features],
        }
        timings["fast_linear_s"] = time.perf_counter() - start
        accelerator.print(
            f"fast linear probe (lr {fast.best_lr}): " + ", ".join(f"{m} {a:.2f}%" for m, a in fast.test.items())
        )
        if accelerator.is_main_process:
            _save_classifier(fast.classifier, probe_args.output_dir, "fast_linear_classifier.safetensors")

    # ------------------------------------------------------- full linear probe
    if "linear" in protocols:
        start = time.perf_counter()
        set_seed(probe_args.seed, device_specific=True)  # distinct augmentations per process
        full = train_linear_probe(
            model,
            loader(train_split, build_train_transform(image_size), True),
            loader(eval_split, eval_transform, False),
            accelerator,
            num_classes,
            image_size,
            kind=probe_args.linear_features,
            n=n,
            lr=probe_args.lr,
            epochs=probe_args.epochs,
            val_freq=probe_args.val_freq,
            seed=probe_args.seed,
        )
        classifier = full.pop("classifier")
        results["linear"] = {
            **full,
            "epochs": probe_args.epochs,
            "lr": probe_args.lr,
            "features": probe_args.linear_features,
            "features_description": describe[probe_args.linear_features],
        }
        timings["linear_s"] = time.perf_counter() - start
        if accelerator.is_main_process:
            _save_classifier(classifier, probe_args.output_dir, "linear_classifier.safetensors")

    results["timings"] = timings
    results["arguments"] = {
        "model": asdict(model_args),
        "data": asdict(data_args),
        "probe": {k: v for k, v in asdict(probe_args).items() if k != "hub_token"},
    }

    # ----------------------------------------------------------------- write
    if accelerator.is_main_process:
        os.makedirs(probe_args.output_dir, exist_ok=True)
        results_path = os.path.join(probe_args.output_dir, "results.json")
        with open(results_path, "w") as f:
            json.dump(results, f, indent=2, default=_json_default)
        accelerator.print(f"results written to {results_path}")
        _publish(results, model_args, data_args, probe_args, results_path)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def _save_classifier(classifier: torch.nn.Module, output_dir: str, filename: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(output_dir, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()},
        os.path.join(output_dir, filename),
    )


def _publish(
    results: dict, model_args: ModelArguments, data_args: DataArguments, probe_args: ProbeArguments, results_path: str
) -> None:
    local = os.path.isdir(model_args.model_name_or_path)
    model_name = os.path.basename(os.path.normpath(model_args.model_name_or_path))
    repo_id = probe_args.hub_model_id or (None if local else model_args.model_name_or_path)
    card = None
    if local and probe_args.update_model_card:
        card_path = os.path.join(model_args.model_name_or_path, "README.md")
        card = update_model_card(card_path, None, results, data_args, probe_args, model_name)
        card.save(card_path)
        logger.info("model card updated: %s", card_path)
    if probe_args.push_to_hub:
        if repo_id is None:
            raise ValueError("--push_to_hub needs --hub_model_id for a local model folder.")
        from huggingface_hub import HfApi

        if card is None:
            card = update_model_card(None, repo_id, results, data_args, probe_args, model_name)
        card.push_to_hub(repo_id, token=probe_args.hub_token, commit_message="Add frozen-feature evaluation results")
        split = results["eval_split"]
        HfApi(token=probe_args.hub_token).upload_file(
            path_or_fileobj=results_path,
            path_in_repo=f"eval_results/{split}_results.json",
            repo_id=repo_id,
            commit_message="Add frozen-feature evaluation results",
        )


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


if __name__ == "__main__":
    main()
