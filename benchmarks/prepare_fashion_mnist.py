#!/usr/bin/env python
"""Convert Fashion-MNIST's IDX files into a `datasets` folder with `image` / `label` columns.

Fashion-MNIST (Xiao et al., 2017, arXiv:1708.07747): 60,000 train and 10,000 test 28x28 grey
images of 10 clothing classes. Debian ships the original files in the package
`dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`, files under
`/usr/share/datasets/fashion-mnist/`). The result loads with `datasets.load_from_disk` and is what
`run_linear_probe.py --dataset_name <out>` and `benchmarks/raw_pixels_knn.py` read.

    python benchmarks/prepare_fashion_mnist.py --output_dir data/fashion_mnist
"""

from __future__ import annotations

import argparse
import gzip
import os
import time

import numpy as np

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"  # where the Debian package installs the files
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FILES = {"train": "train", "test": "t10k"}
_IDX_UBYTE = 0x08


def read_idx(path: str) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes: big-endian magic, then one int32 per dimension."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()}).")
    ndim = data[3]
    shape = tuple(int(x) for x in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {array.size} bytes.")
    return array.reshape(shape)


def load_split(source_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images `[N, 28, 28]` uint8 and labels `[N]` of one split."""
    prefix = FILES[split]
    images = read_idx(os.path.join(source_dir, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(source_dir, f"{prefix}-labels-idx1-ubyte.gz"))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels.")
    return images, labels


def build_dataset_dict(source_dir: str):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASS_NAMES))})
    splits = {}
    for split in FILES:
        images, labels = load_split(source_dir, split)
        # `datasets.Image` stores every array as a lossless PNG (mode "L").
        splits[split] = datasets.Dataset.from_dict(
            {"image": list(images), "label": labels.astype(np.int64).tolist()}, features=features
        )
    return datasets.DatasetDict(splits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source_dir", default=DEBIAN_DIR, help="folder with the four *-ubyte.gz files")
    parser.add_argument("--output_dir", required=True, help="where to save_to_disk the DatasetDict")
    args = parser.parse_args()
    if not os.path.isdir(args.source_dir):
        raise SystemExit(
            f"{args.source_dir} not found: install the Debian package dataset-fashion-mnist or pass --source_dir."
        )
    start = time.perf_counter()
    dataset = build_dataset_dict(args.source_dir)
    dataset.save_to_disk(args.output_dir)
    print(dataset)
    print(f"saved to {args.output_dir} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
