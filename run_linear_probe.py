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

Images are decoded as in pretraining (``esvit.images.decode_image``: EXIF orientation, a pixel cap
``--max_image_pixels``). An image that cannot be decoded (truncated, not an image, over the cap) is
skipped and named in the log; ``results.json`` counts (``skipped_images``) and names
(``skipped_image_names``) them per split, and the run aborts when more than ``--max_bad_fraction`` of
a split is broken. A dataset without an evaluation split (e.g. an image folder of class
sub-folders) is evaluated on a stratified ``--train_val_split`` of train (0.15 unless given).

Writes ``results.json`` to ``--output_dir``; when the model is a local folder, its model card
(README.md) gets ``model-index`` entries stating each protocol, and ``--push_to_hub`` uploads it.
"""

from __future__ import annotations

import os


def parse_arguments_or_exit(argv: list[str] | None = None):
    """The three argument dataclasses, or a one-line error (`esvit.evaluation.arguments` needs no
    torch: `--help` and mistakes answer before the heavy imports below)."""
    from esvit.evaluation.arguments import parse_arguments

    try:
        return parse_arguments(argv)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"run_linear_probe.py: error: {err}") from None


if __name__ == "__main__":  # `--help` and argument mistakes answer in about a second, before the imports below
    os.environ["ESVIT_DEFER_AUTO_REGISTRATION"] = "1"  # `import esvit` without torch until the arguments are valid
    ARGUMENTS = parse_arguments_or_exit()
    del os.environ["ESVIT_DEFER_AUTO_REGISTRATION"]

import json
import logging
import math
import time
from dataclasses import asdict
from datetime import timedelta

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import AutoModel

import esvit
from esvit.evaluation.arguments import (
    DataArguments,
    ModelArguments,
    ProbeArguments,
    parse_protocols,
)
from esvit.evaluation.data import (
    DecodeCheckDataset,
    LabelledImageDataset,
    LabelledSplit,
    ProbeSplits,
    build_eval_transform,
    build_train_transform,
    check_undecodable,
    collate_labelled,
    load_probe_splits,
)
from esvit.evaluation.features import extract_features, find_undecodable_rows
from esvit.evaluation.knn import knn_classify
from esvit.evaluation.linear_probe import fast_linear_probe, train_linear_probe

logger = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------------ protocols
def _describe_features(kind: str, n: int) -> str:
    return {"pooled": "pooled features", "n_last_blocks": f"{n} last blocks"}[kind]


def run_knn(
    train_feats: torch.Tensor,  # [N, D]
    train_labels: torch.Tensor,  # [N]
    eval_feats: torch.Tensor,  # [M, D]
    eval_labels: torch.Tensor,  # [M]
    num_classes: int,
    probe_args: ProbeArguments,
) -> dict:
    """Weighted k-NN on cached centre-crop features: the `results["knn"]` entry."""
    num_train = train_labels.shape[0]
    ks = [k for k in probe_args.nb_knn if k <= num_train]
    if len(ks) < len(probe_args.nb_knn):
        logger.warning(
            "k-NN: skipping k > %d (the number of training images): %s",
            num_train,
            [k for k in probe_args.nb_knn if k > num_train],
        )
    if not ks:
        raise ValueError(f"every k in --nb_knn exceeds the {num_train} training images.")
    knn = knn_classify(
        train_feats,
        train_labels,
        eval_feats,
        eval_labels,
        num_classes,
        ks=ks,
        temperature=probe_args.temperature,
        batch_size=probe_args.knn_batch_size,
    )
    for k, v in knn.items():
        logger.info("%d-NN: %s", k, ", ".join(f"{m} {a:.2f}%" for m, a in v.items()))
    return {
        "features": probe_args.knn_features,
        "temperature": probe_args.temperature,
        "results": {str(k): v for k, v in knn.items()},
    }


def run_fast_linear(
    train_feats: torch.Tensor,  # [N, D]
    train_labels: torch.Tensor,  # [N]
    eval_feats: torch.Tensor,  # [M, D]
    eval_labels: torch.Tensor,  # [M]
    num_classes: int,
    probe_args: ProbeArguments,
    write_classifier: bool,
) -> dict:
    """Linear probe on cached centre-crop features, lr swept on held-out train features."""
    fast = fast_linear_probe(
        train_feats,
        train_labels,
        eval_feats,
        eval_labels,
        num_classes,
        lrs=probe_args.fast_lrs,
        epochs=probe_args.fast_epochs,
        batch_size=probe_args.fast_batch_size,
        holdout_fraction=probe_args.holdout_fraction,
        seed=probe_args.seed,
        show_progress=write_classifier,
    )
    logger.info("fast linear probe (lr %s): %s", fast.best_lr, ", ".join(f"{m} {a:.2f}%" for m, a in fast.test.items()))
    if write_classifier:
        _save_classifier(fast.classifier, probe_args.output_dir, "fast_linear_classifier.safetensors")
    return {
        **fast.test,
        "best_lr": fast.best_lr,
        "sweep_heldout_top1": {str(k): v for k, v in fast.sweep.items()},
        "epochs": probe_args.fast_epochs,
        "batch_size": probe_args.fast_batch_size,
        "holdout_fraction": probe_args.holdout_fraction,
        "features": probe_args.linear_features,
        "features_description": _describe_features(probe_args.linear_features, probe_args.n_last_blocks),
    }


def run_linear(
    model: torch.nn.Module,
    train_loader: DataLoader,  # RandomResizedCrop + flip, shuffled; not yet prepared
    eval_loader: DataLoader,  # centre crop; not yet prepared
    accelerator: Accelerator,
    num_classes: int,
    image_size: int,
    probe_args: ProbeArguments,
) -> dict:
    """The paper's full linear probe: augmented images through the frozen backbone, every epoch."""
    set_seed(probe_args.seed, device_specific=True)  # distinct augmentations per process
    full = train_linear_probe(
        model,
        train_loader,
        eval_loader,
        accelerator,
        num_classes,
        image_size,
        kind=probe_args.linear_features,
        n=probe_args.n_last_blocks,
        lr=probe_args.lr,
        epochs=probe_args.epochs,
        val_freq=probe_args.val_freq,
        seed=probe_args.seed,
    )
    classifier = full.pop("classifier")
    if accelerator.is_main_process:
        _save_classifier(classifier, probe_args.output_dir, "linear_classifier.safetensors")
    return {
        **full,
        "epochs": probe_args.epochs,
        "lr": probe_args.lr,
        "features": probe_args.linear_features,
        "features_description": _describe_features(probe_args.linear_features, probe_args.n_last_blocks),
    }


# ----------------------------------------------------------------------------------------- data
#: Names of skipped images written to results.json per split (all of them are in the log).
MAX_SKIPPED_NAMES_IN_RESULTS = 1000


def load_splits(data_args: DataArguments, seed: int) -> ProbeSplits:
    """The train and evaluation splits named by the arguments (see `load_probe_splits`)."""
    data_files = None
    if data_args.train_file or data_args.eval_file:
        if not data_args.train_file:
            raise ValueError("--eval_file needs --train_file.")
        data_files = {"train": data_args.train_file}
        if data_args.eval_file:
            data_files["eval"] = data_args.eval_file
    return load_probe_splits(
        data_args.dataset_name,
        train_split=data_args.train_split,
        eval_split=data_args.eval_split,
        config_name=data_args.dataset_config_name,
        data_files=data_files,
        image_column=data_args.image_column,
        label_column=data_args.label_column,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
        train_val_split=data_args.train_val_split,
        seed=seed,
        cache_dir=data_args.cache_dir,
    )


def _max_pixels(data_args: DataArguments) -> int | None:
    return data_args.max_image_pixels if data_args.max_image_pixels > 0 else None


def image_loader(
    split: LabelledSplit, transform, data_args: DataArguments, batch_size: int, shuffle: bool = False
) -> DataLoader:
    return DataLoader(
        LabelledImageDataset(split, transform, max_pixels=_max_pixels(data_args)),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=data_args.dataloader_num_workers,
        collate_fn=collate_labelled,
    )


def find_undecodable(split: LabelledSplit, accelerator: Accelerator, data_args: DataArguments, batch_size: int):
    """Rows of `split` that cannot be decoded, from a decode-only pass sharded over the processes."""
    loader = DataLoader(
        DecodeCheckDataset(split, max_pixels=_max_pixels(data_args)),
        batch_size=batch_size,
        num_workers=data_args.dataloader_num_workers,
    )
    return find_undecodable_rows(accelerator.prepare(loader), accelerator, desc=f"decode check ({split.name})")


def report_skipped(split: LabelledSplit, rows: torch.Tensor, role: str, data_args: DataArguments) -> list[str]:
    """Names of the skipped rows (logged); aborts past --max_bad_fraction (same answer on every process)."""
    names = check_undecodable(split, rows.tolist(), data_args.max_bad_fraction, role)
    if names:
        shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more in results.json)" if len(names) > 20 else "")
        logger.warning(
            "%s split %r: %d of %d images cannot be decoded and are skipped: %s",
            role,
            split.name,
            len(names),
            len(split),
            shown,
        )
    return names


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    return evaluate(*parse_arguments_or_exit(argv))


def evaluate(model_args: ModelArguments, data_args: DataArguments, probe_args: ProbeArguments) -> dict:
    """Run the protocols; return the results (also written to `output_dir/results.json`)."""
    protocols = parse_protocols(probe_args.protocol)
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
    batch_size, n = probe_args.per_device_batch_size, probe_args.n_last_blocks

    # ---------------------------------------------------------------- model
    model = AutoModel.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code, revision=model_args.revision
    )
    model.requires_grad_(False).eval().to(accelerator.device)
    image_size = data_args.image_size or getattr(model.config, "image_size", 224)

    # ----------------------------------------------------------------- data
    with accelerator.main_process_first():  # the main process builds any `datasets` cache first
        splits = load_splits(data_args, probe_args.seed)
    num_classes = splits.train.num_classes
    eval_transform = build_eval_transform(image_size, data_args.resize_size)

    # Features for the cached protocols; their pass also finds the undecodable images (a decode-only
    # pass does when only the full probe runs). Those rows are dropped, with their labels, everywhere.
    kinds = sorted(
        {probe_args.knn_features for p in protocols if p == "knn"}
        | {probe_args.linear_features for p in protocols if p == "fast_linear"}
    )
    features: dict[str, tuple[dict[str, torch.Tensor], torch.Tensor]] = {}
    skipped: dict[str, list[str]] = {}
    clean: dict[str, LabelledSplit] = {}
    start = time.perf_counter()
    for role, split in (("train", splits.train), ("eval", splits.eval)):
        if kinds:
            loader = accelerator.prepare(image_loader(split, eval_transform, data_args, batch_size))
            feats, labels, bad_rows = extract_features(
                model, loader, accelerator, kinds, n, desc=f"{role} features", return_skipped=True
            )
            features[role] = ({k: v.to(accelerator.device) for k, v in feats.items()}, labels.to(accelerator.device))
            _save_features(probe_args, accelerator, role, feats, labels, split, bad_rows)
        else:
            bad_rows = find_undecodable(split, accelerator, data_args, batch_size)
        skipped[role] = report_skipped(split, bad_rows, role, data_args)
        clean[role] = split.drop_rows(bad_rows.tolist())
    timings["extraction_s" if kinds else "decode_check_s"] = time.perf_counter() - start
    accelerator.print(
        f"{len(clean['train'])} train / {len(clean['eval'])} eval images ({len(skipped['train'])} / "
        f"{len(skipped['eval'])} skipped as undecodable), {num_classes} classes, {image_size}-px crops, "
        f"{accelerator.num_processes} process(es)"
    )

    results: dict = {
        "model": model_args.model_name_or_path,
        "dataset": data_args.dataset_name or {"train": data_args.train_file, "eval": data_args.eval_file},
        "train_split": splits.train.name,
        "eval_split": splits.eval.name,
        "train_val_split": splits.train_val_split,
        "num_train": len(clean["train"]),
        "num_eval": len(clean["eval"]),
        "skipped_images": {role: len(names) for role, names in skipped.items()},
        "skipped_image_names": {role: names[:MAX_SKIPPED_NAMES_IN_RESULTS] for role, names in skipped.items()},
        "num_classes": num_classes,
        "class_names": splits.train.class_names,
        "image_size": image_size,
        "num_processes": accelerator.num_processes,
        "protocols": protocols,
    }

    # ------------------------------------------------------------ protocols
    # Every process holds all features and runs the same (cheap, seeded) cached protocols, so no
    # process sits in a collective while another one trains.
    for protocol in protocols:
        start = time.perf_counter()
        if protocol == "knn":
            kind = probe_args.knn_features
            (train_feats, train_labels), (eval_feats, eval_labels) = features["train"], features["eval"]
            results["knn"] = run_knn(
                train_feats[kind], train_labels, eval_feats[kind], eval_labels, num_classes, probe_args
            )
        elif protocol == "fast_linear":
            kind = probe_args.linear_features
            (train_feats, train_labels), (eval_feats, eval_labels) = features["train"], features["eval"]
            results["fast_linear"] = run_fast_linear(
                train_feats[kind],
                train_labels,
                eval_feats[kind],
                eval_labels,
                num_classes,
                probe_args,
                write_classifier=accelerator.is_main_process,
            )
        else:
            results["linear"] = run_linear(
                model,
                image_loader(clean["train"], build_train_transform(image_size), data_args, batch_size, shuffle=True),
                image_loader(clean["eval"], eval_transform, data_args, batch_size),
                accelerator,
                num_classes,
                image_size,
                probe_args,
            )
        timings[f"{protocol}_s"] = time.perf_counter() - start

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


def _save_features(
    probe_args: ProbeArguments,
    accelerator: Accelerator,
    role: str,
    feats: dict[str, torch.Tensor],
    labels: torch.Tensor,
    split: LabelledSplit,
    bad_rows: torch.Tensor,
) -> None:
    """features_<role>.safetensors: each kind [N, D], labels [N] and the dataset rows [N] they belong to."""
    if not (probe_args.save_features and accelerator.is_main_process):
        return
    from safetensors.torch import save_file

    keep = torch.ones(len(split), dtype=torch.bool)
    keep[bad_rows] = False
    os.makedirs(probe_args.output_dir, exist_ok=True)
    save_file(
        {**{k: v.contiguous() for k, v in feats.items()}, "labels": labels, "rows": keep.nonzero().flatten()},
        os.path.join(probe_args.output_dir, f"features_{role}.safetensors"),
    )


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
    esvit.register_auto_classes()
    evaluate(*ARGUMENTS)
