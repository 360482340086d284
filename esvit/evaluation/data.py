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
parquet / arrow files, or explicit parquet / arrow / csv / json file patterns.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import datasets
import torch
from PIL import Image
from torchvision import transforms

from ..images import IMAGENET_MEAN, IMAGENET_STD, pick_image_column, to_rgb

__all__ = [
    "LabelledImageDataset",
    "LabelledSplit",
    "build_eval_transform",
    "build_train_transform",
    "collate_labelled",
    "load_labelled_split",
]

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
    candidates = [split] if isinstance(split, str) else list(split)
    found = next((s for s in candidates if s in source), None)
    if found is None:
        raise ValueError(f"none of the splits {candidates} exists; available: {list(source)}.")
    dataset = source[found]
    image_column = pick_image_column(dataset, image_column)
    label_column = _pick_column(dataset, label_column, _LABEL_COLUMN_GUESSES, "label")
    dataset = dataset.select_columns([image_column, label_column])
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


# ------------------------------------------------------------------------------------ torch side
class LabelledImageDataset(torch.utils.data.Dataset):
    """A `LabelledSplit` as a map-style torch dataset of `{"pixel_values", "labels", "index"}`.

    The row index travels with every example so that features gathered from several processes can
    be put back in dataset order (see `esvit.evaluation.features`).
    """

    def __init__(self, split: LabelledSplit, transform: Callable[[Image.Image], torch.Tensor]):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split.dataset)

    def __getitem__(self, index: int) -> dict:
        row = self.split.dataset[int(index)]
        return {
            "pixel_values": self.transform(to_rgb(row[self.split.image_column])),  # [3, S, S]
            "labels": int(row[self.split.label_column]),
            "index": int(index),
        }


def collate_labelled(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),  # [B, 3, S, S]
        "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long),  # [B]
        "index": torch.tensor([e["index"] for e in examples], dtype=torch.long),  # [B]
    }
