"""Build the small Fashion-MNIST sample shipped with the package (`esvit/data/fashion_mnist_500.parquet`).

The sample lets `python run_pretraining.py` train end to end without a download: 500 real images
from the Fashion-MNIST *train* split (Xiao et al. 2017, MIT licence, Zalando Research), 50 per
class, the first 50 of each class in file order. Each row holds the image as PNG bytes (`image`,
a `datasets.Image` feature), its class (`label`, a `ClassLabel`, kept for later evaluation) and its
row in the original train file (`source_index`).

Input: the IDX files of Debian's `dataset-fashion-mnist` package
(`apt-get install dataset-fashion-mnist`, files in /usr/share/datasets/fashion-mnist/).

Usage:
    python benchmarks/make_embedded_sample.py [--source DIR] [--per_class 50] [--output PATH]
"""

from __future__ import annotations

import argparse
import gzip
import io
from pathlib import Path

import numpy as np
from PIL import Image

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
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "esvit" / "data" / "fashion_mnist_500.parquet"


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST container format): magic, dims (big-endian), uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte payload
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {magic:#x}).")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(dims)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def build_sample(source: Path, per_class: int) -> dict[str, list]:
    images = read_idx(source / "train-images-idx3-ubyte.gz")  # [60000, 28, 28]
    labels = read_idx(source / "train-labels-idx1-ubyte.gz")  # [60000]
    rows = sorted(i for c in range(len(CLASS_NAMES)) for i in np.flatnonzero(labels == c)[:per_class])
    return {
        "image": [{"bytes": png_bytes(images[i]), "path": None} for i in rows],
        "label": [int(labels[i]) for i in rows],
        "source_index": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--per_class", type=int, default=50)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()

    import datasets

    features = datasets.Features(
        image=datasets.Image(),
        label=datasets.ClassLabel(names=list(CLASS_NAMES)),
        source_index=datasets.Value("int64"),
    )
    sample = datasets.Dataset.from_dict(build_sample(args.source, args.per_class), features=features)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    sample.to_parquet(str(args.output))
    print(f"wrote {len(sample)} images to {args.output} ({args.output.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
