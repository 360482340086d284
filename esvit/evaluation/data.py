"""Labelled image data for the evaluation protocols, read through 🤗 `datasets`.

The protocols of the paper (Li et al., ICLR 2022, sec. 5; following DINO, Caron et al. 2021) need
two labelled splits and two preprocessing pipelines:

* evaluation view: resize the short side to `resize_size` (256 for 224-px crops, bicubic), centre
  crop `image_size`, ImageNet normalisation. Used for k-NN features, cached linear-probe features
  and linear-probe validation.
* training view: `RandomResizedCrop(image_size)` plus a horizontal flip, ImageNet normalisation.
  Used by the full linear-probe protocol only.

Both sizes are parameters, so tests can run the whole pipeline on 32-px images.

Sources accepted by `load_labelled_split`: a Hub dataset id, a folder written by `save_to_disk`,
an image folder (`<root>/<split>/<class>/<image>` or `<root>/<class>/<image>`), a folder of
parquet / arrow files, or explicit parquet / arrow / csv / json file patterns. `load_probe_splits`
loads the train and evaluation splits together and, when the source has no evaluation split (an
image folder of class sub-folders), holds out a stratified, seeded fraction of train instead.

Images are read exactly as in pretraining: the image column is cast to `datasets.Image(decode=False)`
and every image goes through `esvit.images.decode_image` (EXIF orientation, pixel cap, 8-bit RGB).
An image that cannot be decoded does not stop the evaluation: `LabelledImageDataset` yields a
placeholder flagged `valid = 0` (so batches keep their size and the cross-process gather stays exact),
logs its name, and the protocols drop the row together with its label; `check_undecodable` aborts
when more than `max_bad_fraction` of a split is broken.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import datasets
import torch
from PIL import Image
from torchvision import transforms

from ..images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    UndecodableImage,
    decode_image,
    pick_image_column,
    read_image_bytes,
    to_rgb,
)
from .arguments import DEFAULT_TRAIN_VAL_SPLIT
from .linear_probe import stratified_holdout

__all__ = [
    "DEFAULT_TRAIN_VAL_SPLIT",
    "EVAL_SPLIT_GUESSES",
    "DecodeCheckDataset",
    "LabelledImageDataset",
    "LabelledSplit",
    "ProbeSplits",
    "TooManyUndecodableImages",
    "build_eval_transform",
    "build_train_transform",
    "check_undecodable",
    "collate_labelled",
    "decode_value",
    "hold_out",
    "load_labelled_split",
    "load_probe_splits",
]

logger = logging.getLogger(__name__)

#: Evaluation splits tried, in order, when none is named.
EVAL_SPLIT_GUESSES = ("validation", "val", "test")
_LABEL_COLUMN_GUESSES = ("label", "labels", "fine_label", "class", "target")
_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


# ------------------------------------------------------------------------------------ transforms
def build_eval_transform(
    image_size: int = 224,
    resize_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """Resize (bicubic) + centre crop + normalise. `resize_size` defaults to image_size * 256 / 224."""
    if resize_size is None:
        resize_size = int(round(image_size * 256 / 224))
    if resize_size < image_size:
        raise ValueError(f"resize_size ({resize_size}) must be at least image_size ({image_size}).")
    return transforms.Compose(
        [
            transforms.Resize(resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def build_train_transform(
    image_size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """RandomResizedCrop (bilinear, torchvision's default scale) + horizontal flip + normalise."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=scale),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


# ---------------------------------------------------------------------------------------- loading
@dataclass
class LabelledSplit:
    """One split: the `datasets.Dataset`, its name, its image and label columns, the class names."""

    dataset: datasets.Dataset
    name: str
    image_column: str
    label_column: str
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self, row: int) -> str:
        """A name for row `row` in log messages: its file path and row if it has one, else its row."""
        value = self.dataset[int(row)][self.image_column]
        path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
        return f"{path} (row {row})" if path else f"row {row}"

    def drop_rows(self, rows: Sequence[int]) -> LabelledSplit:
        """This split without the given rows (e.g. the undecodable ones), in the same order."""
        if not len(rows):
            return self
        dropped = {int(r) for r in rows}
        kept = [i for i in range(len(self.dataset)) if i not in dropped]
        return LabelledSplit(
            self.dataset.select(kept), self.name, self.image_column, self.label_column, self.class_names
        )


def _load_source(
    name_or_path: str | None,
    config_name: str | None,
    data_files: dict[str, str] | None,
    cache_dir: str | None,
) -> datasets.DatasetDict:
    if data_files:
        suffixes = {os.path.splitext(p)[1].lower() for p in data_files.values()}
        builders = {_FILE_BUILDERS.get(s) for s in suffixes}
        if len(builders) != 1 or None in builders:
            raise ValueError(f"data files must all be one of {sorted(_FILE_BUILDERS)}; got {sorted(suffixes)}.")
        return datasets.load_dataset(builders.pop(), data_files=data_files, cache_dir=cache_dir)
    if not name_or_path:
        raise ValueError("give a dataset name or path, or data files.")
    if os.path.isdir(name_or_path):
        if os.path.isfile(os.path.join(name_or_path, "dataset_dict.json")) or os.path.isfile(
            os.path.join(name_or_path, "state.json")
        ):
            loaded = datasets.load_from_disk(name_or_path)
            if isinstance(loaded, datasets.Dataset):
                return datasets.DatasetDict({"train": loaded})
            return loaded
        for suffix, builder in _FILE_BUILDERS.items():
            if glob.glob(os.path.join(name_or_path, "**", f"*{suffix}"), recursive=True):
                # Folders of tabular files: `datasets` infers the splits from the file names.
                return datasets.load_dataset(builder, data_dir=name_or_path, cache_dir=cache_dir)
        return datasets.load_dataset("imagefolder", data_dir=name_or_path, cache_dir=cache_dir)
    if os.path.isfile(name_or_path):
        suffix = os.path.splitext(name_or_path)[1].lower()
        if suffix not in _FILE_BUILDERS:
            raise ValueError(f"cannot read {name_or_path!r}: expected one of {sorted(_FILE_BUILDERS)}.")
        return datasets.load_dataset(_FILE_BUILDERS[suffix], data_files=name_or_path, cache_dir=cache_dir)
    return datasets.load_dataset(name_or_path, config_name, cache_dir=cache_dir)


def _pick_column(dataset: datasets.Dataset, wanted: str | None, guesses: Sequence[str], what: str) -> str:
    if wanted is not None:
        if wanted not in dataset.column_names:
            raise ValueError(f"{what} column {wanted!r} not found; columns are {dataset.column_names}.")
        return wanted
    for guess in guesses:
        if guess in dataset.column_names:
            return guess
    raise ValueError(f"no {what} column among {dataset.column_names}; name it with --{what}_column.")


def load_labelled_split(
    name_or_path: str | None,
    split: str | Sequence[str],
    *,
    config_name: str | None = None,
    data_files: dict[str, str] | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    class_names: Sequence[str] | None = None,
    max_samples: int | None = None,
    cache_dir: str | None = None,
) -> LabelledSplit:
    """Load one labelled split.

    Args:
        name_or_path: Hub id, `save_to_disk` folder, image folder, folder or file of parquet/arrow.
        split: the split name, or several candidates tried in order (e.g. `("validation", "test")`).
        data_files: `{split: pattern}` of parquet / arrow / csv / json files (instead of a name).
        image_column, label_column: guessed from common names when None.
        class_names: names to map string labels to indices (the train split's, so both splits
            agree); inferred when None.
        max_samples: keep only the first rows (quick runs).
    """
    source = _load_source(name_or_path, config_name, data_files, cache_dir)
    found = _find_split(source, split)
    if found is None:
        candidates = [split] if isinstance(split, str) else list(split)
        raise ValueError(f"none of the splits {candidates} exists; available: {list(source)}.")
    return _labelled(source[found], found, image_column, label_column, class_names, max_samples)


def _find_split(source: datasets.DatasetDict, split: str | Sequence[str]) -> str | None:
    candidates = [split] if isinstance(split, str) else list(split)
    return next((s for s in candidates if s in source), None)


def _labelled(
    dataset: datasets.Dataset,
    found: str,
    image_column: str | None,
    label_column: str | None,
    class_names: Sequence[str] | None,
    max_samples: int | None,
) -> LabelledSplit:
    """Two columns (undecoded images, class indices) of one split, and the class names."""
    image_column = pick_image_column(dataset, image_column)
    label_column = _pick_column(dataset, label_column, _LABEL_COLUMN_GUESSES, "label")
    dataset = dataset.select_columns([image_column, label_column])
    image_feature = dataset.features[image_column]
    if isinstance(image_feature, datasets.Image) or (
        isinstance(image_feature, datasets.Value) and image_feature.dtype in ("string", "large_string", "binary")
    ):
        # Decoded by `decode_image` (as in pretraining: EXIF orientation, pixel cap), not by `datasets`,
        # so that a broken file is one skipped image rather than an exception inside the DataLoader.
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"split {found!r} is empty.")

    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(class_names) if class_names is not None else list(feature.names)
        if names != list(feature.names):
            # e.g. an image-folder split that lacks a class: re-index by the training classes.
            missing = set(feature.names) - set(names)
            if missing:
                raise ValueError(
                    f"classes {sorted(missing)[:5]} of split {found!r} are not among the training classes."
                )
            dataset = dataset.align_labels_with_mapping({n: i for i, n in enumerate(names)}, label_column)
    elif feature.dtype == "string":
        names = list(class_names) if class_names is not None else sorted(set(dataset[label_column]))
        index = {name: i for i, name in enumerate(names)}
        unknown = set(dataset[label_column]) - set(index)
        if unknown:
            raise ValueError(f"labels {sorted(unknown)[:5]} are not among the training classes.")
        dataset = dataset.cast_column(label_column, datasets.ClassLabel(names=names))
    elif feature.dtype.startswith("int"):
        if class_names is not None:
            names = list(class_names)
        else:
            names = [str(i) for i in range(int(max(dataset[label_column])) + 1)]
    else:
        raise ValueError(f"label column {label_column!r} has type {feature.dtype}; expected class indices or names.")
    labels = dataset[label_column]
    if min(labels) < 0 or max(labels) >= len(names):
        raise ValueError(f"labels of split {found!r} lie outside [0, {len(names)}).")
    return LabelledSplit(dataset, found, image_column, label_column, names)


@dataclass
class ProbeSplits:
    """The train and evaluation splits of a probe run.

    `train_val_split` is the share of train held out as the evaluation split when the source had
    none (None when the evaluation split is the source's own).
    """

    train: LabelledSplit
    eval: LabelledSplit
    train_val_split: float | None = None


def hold_out(split: LabelledSplit, fraction: float, seed: int = 0) -> tuple[LabelledSplit, LabelledSplit]:
    """Split `split` into (train, held-out): `fraction` of every class, chosen with `seed`.

    Both parts keep the original row order and the class names; a class with one image stays in
    train. The held-out part is named `<split>_holdout_<fraction>` (e.g. "train_holdout_0.15").
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--train_val_split must lie in (0, 1), got {fraction}.")
    labels = torch.tensor(split.dataset[split.label_column], dtype=torch.long)
    fit, held = stratified_holdout(labels, fraction, seed)
    common = (split.image_column, split.label_column, split.class_names)
    return (
        LabelledSplit(split.dataset.select(fit.tolist()), split.name, *common),
        LabelledSplit(split.dataset.select(held.tolist()), f"{split.name}_holdout_{fraction:g}", *common),
    )


def load_probe_splits(
    name_or_path: str | None,
    *,
    train_split: str = "train",
    eval_split: str | None = None,
    config_name: str | None = None,
    data_files: dict[str, str] | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    train_val_split: float | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
) -> ProbeSplits:
    """Load the train split and the evaluation split (with the train split's class names).

    The evaluation split is `eval_split`, else the first of `EVAL_SPLIT_GUESSES` present (with
    `data_files`: the "eval" entry). When the source has none of them (e.g. an image folder of class
    sub-folders) and `eval_split` was not named, a stratified `train_val_split` of train (default
    `DEFAULT_TRAIN_VAL_SPLIT`), drawn with `seed`, is held out instead; `max_train_samples` and
    `max_eval_samples` then cap the two parts.
    """
    source = _load_source(name_or_path, config_name, data_files, cache_dir)
    train_name = "train" if data_files else train_split
    if train_name not in source:
        raise ValueError(f"none of the splits [{train_name!r}] exists; available: {list(source)}.")
    candidates = ["eval"] if data_files else ([eval_split] if eval_split else list(EVAL_SPLIT_GUESSES))
    found = _find_split(source, candidates)
    if found is None and eval_split is not None:
        raise ValueError(f"none of the splits {candidates} exists; available: {list(source)}.")
    columns = (image_column, label_column)

    if found is not None:
        if train_val_split is not None:
            logger.warning(
                "--train_val_split %s ignored: the dataset has an evaluation split (%r).", train_val_split, found
            )
        train = _labelled(source[train_name], train_name, *columns, None, max_train_samples)
        evaluation = _labelled(source[found], found, *columns, train.class_names, max_eval_samples)
        return ProbeSplits(train, evaluation)

    if train_val_split is None:
        train_val_split = DEFAULT_TRAIN_VAL_SPLIT
        logger.warning(
            "No evaluation split among %s (the dataset has %s): holding out a stratified %g of %r for "
            "evaluation (--train_val_split %g, seed %d).",
            candidates,
            list(source),
            train_val_split,
            train_name,
            train_val_split,
            seed,
        )
    else:
        logger.info("Holding out a stratified %g of %r for evaluation (seed %d).", train_val_split, train_name, seed)
    full = _labelled(source[train_name], train_name, *columns, None, None)
    train, evaluation = hold_out(full, train_val_split, seed)
    train, evaluation = _first_rows(train, max_train_samples), _first_rows(evaluation, max_eval_samples)
    return ProbeSplits(train, evaluation, train_val_split)


def _first_rows(split: LabelledSplit, max_samples: int | None) -> LabelledSplit:
    if max_samples is None or max_samples >= len(split):
        return split
    return LabelledSplit(
        split.dataset.select(range(max_samples)), split.name, split.image_column, split.label_column, split.class_names
    )


# ------------------------------------------------------------------------------ undecodable images
class TooManyUndecodableImages(ValueError):
    """More than `max_bad_fraction` of a split cannot be decoded: the data (or its path) is broken."""


def check_undecodable(split: LabelledSplit, rows: Sequence[int], max_bad_fraction: float, role: str) -> list[str]:
    """Names of the undecodable `rows` of `split`; raises when they exceed `max_bad_fraction` of it.

    `role` ("train" or "eval") names the split in the message.
    """
    names = [split.describe(r) for r in rows]
    total = len(split)
    if names and (len(names) > max_bad_fraction * total or len(names) == total):
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        limit = (
            "nothing is left to evaluate"
            if len(names) == total
            else f"more than --max_bad_fraction {max_bad_fraction:g} allows"
        )
        raise TooManyUndecodableImages(
            f"{len(names)} of {total} images ({100.0 * len(names) / total:.1f}%) of the {role} split "
            f"{split.name!r} cannot be decoded, {limit}; first: {shown}. Check the data (the log names each "
            "file and the reason), or raise --max_bad_fraction."
        )
    return names


# ------------------------------------------------------------------------------------ torch side
def decode_value(value, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """An image cell of a `LabelledSplit` as upright RGB; raises `UndecodableImage`.

    Undecoded values (bytes / path dicts, bytes, paths, a missing image) go through `decode_image`,
    exactly as in pretraining; an already decoded image (e.g. a numpy array column) through `to_rgb`.
    """
    if value is None or isinstance(value, (dict, bytes, bytearray, str)):
        return decode_image(read_image_bytes(value), max_pixels=max_pixels)
    return to_rgb(value)


def _log_skipped(split: LabelledSplit, row: int, err: Exception) -> None:
    logger.warning("Skipping image %s of split %r: it cannot be decoded (%s).", split.describe(row), split.name, err)


class LabelledImageDataset(torch.utils.data.Dataset):
    """A `LabelledSplit` as a map-style torch dataset of `{"pixel_values", "labels", "index", "valid"}`.

    The row index travels with every example so that features gathered from several processes can
    be put back in dataset order (see `esvit.evaluation.features`). An image that cannot be decoded
    is logged with its name and the reason and comes back as an all-zero placeholder with
    `valid = False`, so that batches keep their size (the gather of the last, padded batch relies on
    it); the protocols drop such rows together with their labels.

    Args:
        split: the labelled split (images undecoded, see `load_labelled_split`).
        transform: decoded RGB image -> tensor.
        max_pixels: pixel cap of `decode_image` (None: no cap).
    """

    def __init__(
        self,
        split: LabelledSplit,
        transform: Callable[[Image.Image], torch.Tensor],
        max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        self.split = split
        self.transform = transform
        self.max_pixels = max_pixels
        self._placeholder: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.split.dataset)

    def __getitem__(self, index: int) -> dict:
        row = self.split.dataset[int(index)]
        try:
            image = decode_value(row[self.split.image_column], self.max_pixels)
        except UndecodableImage as err:
            _log_skipped(self.split, index, err)
            pixel_values, valid = self.placeholder(), False
        else:
            pixel_values, valid = self.transform(image), True  # [3, S, S]
        return {
            "pixel_values": pixel_values,
            "labels": int(row[self.split.label_column]),
            "index": int(index),
            "valid": valid,
        }

    def placeholder(self) -> torch.Tensor:
        """Zeros of the transform's output shape (found on a blank image, without using up random numbers)."""
        if self._placeholder is None:
            with torch.random.fork_rng(devices=[]):
                self._placeholder = torch.zeros_like(self.transform(Image.new("RGB", (64, 64))))
        return self._placeholder


class DecodeCheckDataset(torch.utils.data.Dataset):
    """Decode every image of a split, keep nothing: `{"index", "valid"}` per row.

    The pass that finds the undecodable images when no features are extracted (the full linear probe
    alone), so that its training split is clean from the first epoch.
    """

    def __init__(self, split: LabelledSplit, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        self.split = split
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.split.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            decode_value(self.split.dataset[int(index)][self.split.image_column], self.max_pixels)
        except UndecodableImage as err:
            _log_skipped(self.split, index, err)
            return {"index": int(index), "valid": False}
        return {"index": int(index), "valid": True}


def collate_labelled(examples: list[dict]) -> dict[str, torch.Tensor]:
    batch = {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),  # [B, 3, S, S]
        "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long),  # [B]
        "index": torch.tensor([e["index"] for e in examples], dtype=torch.long),  # [B]
    }
    if "valid" in examples[0]:
        batch["valid"] = torch.tensor([e["valid"] for e in examples], dtype=torch.bool)  # [B]
    return batch
