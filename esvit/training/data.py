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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from ..images import DEFAULT_MAX_IMAGE_PIXELS, UndecodableImage, decode_image, pick_image_column, read_image_bytes
from .arguments import IMAGE_SUFFIXES, DataArguments, pair
from .multicrop import build_augmentation

logger = logging.getLogger(__name__)

#: The default training data: 500 Fashion-MNIST train images (see `esvit/data/README.md`).
EMBEDDED_DATASET = Path(__file__).resolve().parents[1] / "data" / "fashion_mnist_500.parquet"

FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}


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
def min_side_for_crops(args: DataArguments) -> int:
    """The shorter image side above which no crop of the recipe is upsampled: a crop of area
    fraction `s` of a square image of side `S` has side `sqrt(s) * S`, so decoding at
    `S = crop / sqrt(s_min)` still gives every crop at least its output resolution."""
    global_low = pair(args.global_crops_scale, "global_crops_scale")[0]
    local_low = pair(args.local_crops_scale, "local_crops_scale")[0]
    sides = [args.global_crop_size / global_low**0.5]
    if args.num_local_crops:
        sides.append(args.local_crop_size / local_low**0.5)
    return int(max(sides)) + 1


class MultiCropCollator:
    """`DataLoader` collate function: decode, multi-crop and stack a list of undecoded rows.

    Returns `{"crops": [n_crops x [B', 3, h, w]], "keys": [B'] int64, "num_skipped": int,
    "skipped": [names]}` where B' counts the images that decoded. `epoch` must be set before each
    epoch's iterator is created (workers receive a copy of this object when they start, so
    `persistent_workers` must stay off).

    Args:
        augment: `MultiCropAugmentation` (or any callable `(image, seed=...) -> list[Tensor]`).
        seed: the run's seed; with `epoch` and the image's content it fixes every crop.
        max_pixels: images of more pixels are skipped (see `images.decode_image`).
        min_side: JPEGs may be decoded at a reduced size whose shorter side stays at least this
            (None: always full size). `min_side_for_crops` gives the size no crop needs to exceed.
    """

    def __init__(
        self,
        augment: Callable[..., list[torch.Tensor]],
        seed: int,
        max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        min_side: int | None = None,
    ):
        self.augment = augment
        self.seed = seed
        self.max_pixels = max_pixels
        self.min_side = min_side
        self.epoch = 0

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        per_image: list[list[torch.Tensor]] = []
        keys: list[int] = []
        skipped: list[str] = []
        for example in examples:
            try:
                raw = read_image_bytes(example["image"])
                image = decode_image(raw, max_pixels=self.max_pixels, min_side=self.min_side)
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

    def known_batches_per_epoch(self, args: DataArguments, batch_size: int, accelerator) -> int | None:
        """Batches per epoch and process, also for a stream whose source has a known length (a
        `save_to_disk` folder, a Hub split whose card gives its size); None when it has none."""
        if not self.streaming:
            return self.batches_per_epoch
        num_examples = None
        if args.dataset_from_disk:
            loaded = datasets.load_from_disk(args.dataset_from_disk)
            num_examples = len(loaded[args.dataset_split] if isinstance(loaded, datasets.DatasetDict) else loaded)
        elif self.dataset.info is not None and self.dataset.info.splits:
            split = self.dataset.info.splits.get(args.dataset_split)
            num_examples = split.num_examples if split is not None and split.num_examples else None
        if num_examples is None:
            return None
        if args.max_train_samples is not None:
            num_examples = min(num_examples, args.max_train_samples)
        return num_examples // (batch_size * accelerator.num_processes) or None

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
    "MultiCropCollator",
    "min_side_for_crops",
    "build_augmentation",
    "PretrainingLoader",
    "build_pretraining_loader",
    "content_key",
    "describe_example",
    "load_pretraining_images",
    "sample_seed",
]
