"""Unlabelled images for EsViT pretraining, read through 🤗 `datasets`, cut into multi-crop batches.

EsViT (Li et al., ICLR 2022, arXiv:2106.09785) trains on images alone: each image becomes two
global and N local crops (`esvit.training.multicrop`), and a batch is one `[B, 3, h, w]` tensor per crop.

Sources (`load_pretraining_images`): a Hub dataset (name, config, split, image column), a local
image folder (`imagefolder`), parquet / arrow / image files, a `save_to_disk` folder, or, with
none of these, the Fashion-MNIST sample shipped in `esvit/data`. Any of them can be streamed
(`streaming=True` gives a `datasets.IterableDataset`).

Decoding is ours, not `datasets`': the image column is cast to `Image(decode=False)` and every
image is read and decoded in the DataLoader workers, inside the collate function. So an image that
cannot be decoded is skipped, counted and named in the log instead of stopping the run, and
multi-crop runs in the workers for map-style and streamed data alike (an `IterableDataset` has no
`with_transform`; augmenting in `.map` would, under the "examples" split strategy, augment every
example on every process before the split drops most of them).

Reproducibility: the crops of an image depend only on (seed, epoch, content of the image), never on
the process, the worker or the batch it lands in. The per-image seed hashes the image's encoded
bytes, which exist identically in a map-style and a streamed copy of a dataset, so the two feed
the same crops, and a run on 1 process equals a run on 2 processes with the same global batch.

Sharding across processes happens exactly once (`build_pretraining_loader`):
* map-style data: `accelerator.prepare(dataloader)`; accelerate's seedable sampler draws one
  permutation per epoch from (seed, epoch), identical on every process, and gives process `r` the
  batches `r, r + P, ...`, dropping the incomplete tail, so processes see disjoint images and the
  global batch does not depend on the number of processes;
* streams: `datasets.distributed.split_dataset_by_node` and a plain, *unprepared* DataLoader
  (preparing it as well would shard twice and silently drop data). Each process then reads and
  decodes only its own shards or examples, instead of reading the whole stream and keeping
  1/P of it as accelerate's `IterableDatasetShard` would.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch

from ..images import UndecodableImage, decode_image, pick_image_column, read_image_bytes
from .multicrop import MultiCropAugmentation

logger = logging.getLogger(__name__)

#: The default training data: 500 Fashion-MNIST train images (see `esvit/data/README.md`).
EMBEDDED_DATASET = Path(__file__).resolve().parents[1] / "data" / "fashion_mnist_500.parquet"

FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# ------------------------------------------------------------------------------------ arguments
@dataclass
class DataArguments:
    """Where the images come from and how they are cut into crops."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id (e.g. 'ILSVRC/imagenet-1k') or a local dataset folder `load_dataset` reads."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    image_column: str | None = field(
        default=None, metadata={"help": "Image column; default: the first `Image` column, or 'image'/'img'."}
    )
    train_dir: str | None = field(
        default=None, metadata={"help": "Local folder of images (any depth), read with `imagefolder`."}
    )
    train_files: list[str] | None = field(
        default=None, metadata={"help": "Parquet / arrow files (or image files); glob patterns allowed."}
    )
    dataset_from_disk: str | None = field(default=None, metadata={"help": "A folder written by `save_to_disk`."})
    streaming: bool = field(default=False, metadata={"help": "Stream the data (no download, no length)."})
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Shuffle buffer of a stream."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N images."})
    dataset_cache_dir: str | None = field(default=None, metadata={"help": "`datasets` cache folder."})
    dataloader_num_workers: int = field(
        default=4, metadata={"help": "Decoding / augmentation workers per process (a stream: at most its shards)."}
    )
    global_crop_size: int = field(default=224, metadata={"help": "Side of the 2 global crops."})
    global_crops_scale: list[float] = field(
        default_factory=lambda: [0.4, 1.0], metadata={"help": "Area fraction range of the global crops."}
    )
    local_crop_size: int = field(default=96, metadata={"help": "Side of the local crops."})
    num_local_crops: int = field(default=8, metadata={"help": "Number of local crops."})
    local_crops_scale: list[float] = field(
        default_factory=lambda: [0.05, 0.4], metadata={"help": "Area fraction range of the local crops."}
    )
    blur_probs: list[float] = field(
        default_factory=lambda: [1.0, 0.1, 0.5],
        metadata={"help": "Gaussian-blur probability of (global 1, global 2, local) crops; zeros for tiny images."},
    )

    def __post_init__(self):
        sources = [n for n in ("dataset_name", "train_dir", "train_files", "dataset_from_disk") if getattr(self, n)]
        if len(sources) > 1:
            raise ValueError(f"give one data source, got {', '.join('--' + s for s in sources)}.")
        for name in ("global_crops_scale", "local_crops_scale"):
            low, high = _pair(getattr(self, name), name)
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {getattr(self, name)}.")
        if len(self.blur_probs) != 3:
            raise ValueError(f"blur_probs needs 3 probabilities, got {self.blur_probs}.")
        if self.dataloader_num_workers < 0 or self.num_local_crops < 0:
            raise ValueError("dataloader_num_workers and num_local_crops must be >= 0.")

    @property
    def uses_embedded_dataset(self) -> bool:
        return not (self.dataset_name or self.train_dir or self.train_files or self.dataset_from_disk)

    def describe_source(self) -> str:
        """One line naming the data, for logs and model cards."""
        if self.dataset_name:
            config = f" ({self.dataset_config_name})" if self.dataset_config_name else ""
            return f"{self.dataset_name}{config}, split {self.dataset_split}"
        if self.train_dir:
            return f"image folder {self.train_dir}"
        if self.train_files:
            return f"files {', '.join(self.train_files)}"
        if self.dataset_from_disk:
            return f"saved dataset {self.dataset_from_disk}"
        return "the embedded Fashion-MNIST sample (500 train images, esvit/data)"


def _pair(values: Sequence[float], name: str) -> tuple[float, float]:
    if len(values) != 2:
        raise ValueError(f"{name} needs two numbers (low high), got {values}.")
    return float(values[0]), float(values[1])


# ------------------------------------------------------------------------------------- loading
def load_pretraining_images(args: DataArguments) -> datasets.Dataset | datasets.IterableDataset:
    """The training images as a one-column (`image`, undecoded) dataset, streamed if asked.

    Rows are `{"image": {"bytes": bytes | None, "path": str | None}}`; decode them with
    `decode_image`. Every other column (labels, captions, ...) is dropped.
    """
    dataset = _load_split(args)
    column = pick_image_column(dataset, args.image_column)
    dataset = dataset.select_columns([column])
    if column != "image":
        dataset = dataset.rename_column(column, "image")
    dataset = dataset.cast_column("image", datasets.Image(decode=False))
    if args.max_train_samples is not None:
        dataset = (
            dataset.take(args.max_train_samples)
            if isinstance(dataset, datasets.IterableDataset)
            else dataset.select(range(min(args.max_train_samples, len(dataset))))
        )
    return dataset


def _load_split(args: DataArguments) -> datasets.Dataset | datasets.IterableDataset:
    common = dict(streaming=args.streaming, cache_dir=args.dataset_cache_dir)
    if args.dataset_from_disk:
        loaded = datasets.load_from_disk(args.dataset_from_disk)
        if isinstance(loaded, datasets.DatasetDict):
            if args.dataset_split not in loaded:
                raise ValueError(
                    f"split {args.dataset_split!r} not in {args.dataset_from_disk}; it has {list(loaded)}."
                )
            loaded = loaded[args.dataset_split]
        # Several shards, so that a stream can feed several DataLoader workers and processes.
        return loaded.to_iterable_dataset(num_shards=max(1, min(64, len(loaded)))) if args.streaming else loaded
    if args.dataset_name:
        return datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.dataset_split, **common)
    # Local files: `datasets` puts them in one split named "train".
    if args.train_dir:
        if not os.path.isdir(args.train_dir):
            raise FileNotFoundError(f"--train_dir {args.train_dir!r} is not a folder.")
        builder, source = "imagefolder", dict(data_dir=args.train_dir)
    elif args.train_files:
        builder, source = _builder_for_files(args.train_files), dict(data_files={"train": list(args.train_files)})
    else:
        builder, source = "parquet", dict(data_files={"train": str(EMBEDDED_DATASET)})
    return datasets.load_dataset(builder, split="train", **source, **common)


def _builder_for_files(files: Sequence[str]) -> str:
    suffixes = {os.path.splitext(f)[1].lower() for f in files}
    if suffixes <= set(IMAGE_SUFFIXES):
        return "imagefolder"
    builders = {FILE_BUILDERS.get(s) for s in suffixes}
    if len(builders) != 1 or None in builders:
        raise ValueError(
            f"--train_files must all be parquet, all arrow or all images; got suffixes {sorted(suffixes)}."
        )
    return builders.pop()


# ------------------------------------------------------------------------------------ identity
def content_key(raw: bytes) -> int:
    """A 63-bit identity of an image: a hash of its encoded bytes (fits an int64 tensor)."""
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") >> 1


def sample_seed(seed: int, epoch: int, key: int) -> int:
    """The augmentation seed of one image in one epoch; a function of these three numbers only."""
    packed = struct.pack("<qqq", seed, epoch, key)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") >> 1


def describe_example(example: dict) -> str:
    """A name for an image in log messages: its path if it has one, else its row."""
    value = example.get("image")
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    row = example.get("row")
    if path and row is not None:
        return f"{path} (row {row})"
    if path:
        return str(path)
    return f"row {row}" if row is not None else "an image of the stream without a path"


# ------------------------------------------------------------------------------------ batching
def build_augmentation(args: DataArguments) -> MultiCropAugmentation:
    """The multi-crop augmentation described by `args` (2 global + `num_local_crops` local crops)."""
    return MultiCropAugmentation(
        global_crop_size=args.global_crop_size,
        global_crops_scale=_pair(args.global_crops_scale, "global_crops_scale"),
        local_crops_number=args.num_local_crops,
        local_crop_size=args.local_crop_size,
        local_crops_scale=_pair(args.local_crops_scale, "local_crops_scale"),
        blur_probs=tuple(args.blur_probs),
    )


class MultiCropCollator:
    """`DataLoader` collate function: decode, multi-crop and stack a list of undecoded rows.

    Returns `{"crops": [n_crops x [B', 3, h, w]], "keys": [B'] int64, "num_skipped": int,
    "skipped": [names]}` where B' counts the images that decoded. `epoch` must be set before each
    epoch's iterator is created (workers receive a copy of this object when they start, so
    `persistent_workers` must stay off).

    Args:
        augment: `MultiCropAugmentation` (or any callable `(image, seed=...) -> list[Tensor]`).
        seed: the run's seed; with `epoch` and the image's content it fixes every crop.
    """

    def __init__(self, augment: Callable[..., list[torch.Tensor]], seed: int):
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        per_image: list[list[torch.Tensor]] = []
        keys: list[int] = []
        skipped: list[str] = []
        for example in examples:
            try:
                raw = read_image_bytes(example["image"])
                image = decode_image(raw)
            except UndecodableImage as err:
                name = describe_example(example)
                logger.warning("Skipping image %s: it cannot be decoded (%s).", name, err)
                skipped.append(name)
                continue
            key = content_key(raw)
            per_image.append(self.augment(image, seed=sample_seed(self.seed, self.epoch, key)))
            keys.append(key)
        crops = [torch.stack(group) for group in zip(*per_image)]  # n_crops x [B', 3, h, w]
        return {
            "crops": crops,
            "keys": torch.tensor(keys, dtype=torch.int64),  # [B']
            "num_skipped": len(skipped),
            "skipped": skipped,
        }


class _RowIndexed(torch.utils.data.Dataset):
    """A map-style `datasets.Dataset` whose rows also carry their index (to name bad images)."""

    def __init__(self, dataset: datasets.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.dataset[int(index)]["image"], "row": int(index)}

    def __getitems__(self, indices: list[int]) -> list[dict]:
        # One arrow read per batch instead of one per row.
        images = self.dataset[list(indices)]["image"]
        return [{"image": image, "row": int(i)} for i, image in zip(indices, images)]


@dataclass
class PretrainingLoader:
    """This process's share of the training images, one epoch at a time.

    Attributes:
        dataloader: for map-style data the accelerate-prepared loader; for a stream a plain one.
        collator: the collate function (its `epoch` selects the crops).
        dataset: the process's dataset (a stream already split by node).
        streaming: whether `dataset` is an `IterableDataset`.
        device: where batches go (a prepared loader moves them itself).
    """

    dataloader: torch.utils.data.DataLoader
    collator: MultiCropCollator
    dataset: datasets.Dataset | datasets.IterableDataset
    streaming: bool
    device: torch.device

    @property
    def batches_per_epoch(self) -> int | None:
        """Batches per epoch on every process; None for a stream (no length)."""
        return None if self.streaming else len(self.dataloader)

    def epoch(self, epoch: int, skip_batches: int = 0, accelerator=None) -> Iterator[dict]:
        """Iterate one epoch's batches, optionally skipping the first `skip_batches` (resume).

        Skipping costs nothing for map-style data (the sampler skips indices); a stream's skipped
        batches are read, decoded and dropped, because a stream cannot seek.
        """
        self.collator.epoch = epoch
        if self.streaming:
            self.dataset.set_epoch(epoch)  # reshuffles the shard order and the shuffle buffer
        else:
            self.dataloader.set_epoch(epoch)  # the seedable sampler's permutation
        loader = self.dataloader
        if skip_batches:
            if accelerator is None:
                raise ValueError("skipping batches needs the accelerator (`skip_first_batches`).")
            loader = accelerator.skip_first_batches(loader, skip_batches)
        for batch in loader:
            if self.streaming:
                batch = {**batch, "crops": [c.to(self.device, non_blocking=True) for c in batch["crops"]]}
            yield batch


def build_pretraining_loader(
    dataset: datasets.Dataset | datasets.IterableDataset,
    *,
    accelerator,
    collator: MultiCropCollator,
    batch_size: int,
    num_workers: int,
    seed: int,
    shuffle_buffer_size: int = 10_000,
) -> PretrainingLoader:
    """Shard `dataset` over the processes of `accelerator` (once; see the module docstring)."""
    pin_memory = accelerator.device.type == "cuda"
    if isinstance(dataset, datasets.IterableDataset):
        from datasets.distributed import split_dataset_by_node

        # Same seed on every process: the shard order must agree for the split to be disjoint.
        dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
        dataset = split_dataset_by_node(dataset, rank=accelerator.process_index, world_size=accelerator.num_processes)
        workers = min(num_workers, dataset.num_shards)
        if workers < num_workers:
            logger.info("Streaming with %d DataLoader workers: %d shards here.", workers, dataset.num_shards)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=collator,
            drop_last=True,
            pin_memory=pin_memory,
        )
        return PretrainingLoader(loader, collator, dataset, True, accelerator.device)

    loader = torch.utils.data.DataLoader(
        _RowIndexed(dataset),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=num_workers,
        collate_fn=collator,
        pin_memory=pin_memory,
        # A private generator: creating an epoch's iterator must not draw from the global torch
        # generator, whose state (drop-path) is checkpointed and must not depend on data loading.
        generator=torch.Generator().manual_seed(seed),
    )
    loader = accelerator.prepare(loader)
    if len(loader) == 0:
        raise ValueError(
            f"{len(dataset)} images do not fill one batch of {batch_size} on each of "
            f"{accelerator.num_processes} processes; lower the batch size or add images."
        )
    return PretrainingLoader(loader, collator, dataset, False, accelerator.device)


__all__ = [
    "EMBEDDED_DATASET",
    "DataArguments",
    "MultiCropCollator",
    "build_augmentation",
    "PretrainingLoader",
    "UndecodableImage",
    "build_pretraining_loader",
    "content_key",
    "decode_image",
    "describe_example",
    "load_pretraining_images",
    "pick_image_column",
    "read_image_bytes",
    "sample_seed",
]
