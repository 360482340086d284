#!/usr/bin/env python
"""Weighted k-NN on raw pixels: the floor any learned feature must beat.

Runs `esvit.evaluation.knn.knn_classify` (DINO's weighted k-NN: cosine similarity, votes exp(s / T)) with
the flattened pixels of each image as its feature. On Fashion-MNIST (prepared by
`benchmarks/prepare_fashion_mnist.py`) k = 20, T = 0.07 gives about 84.6% top-1 on the 10,000 test
images (about 86.1% after removing the mean training image).

    python benchmarks/raw_pixels_knn.py --dataset_path data/fashion_mnist [--center]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from esvit.evaluation.knn import knn_classify  # noqa: E402


def pixels_and_labels(split) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels `[N, H*W*C]` in [0, 1] (float32) and labels `[N]` of a `datasets` split."""
    table = split.with_format("numpy")
    images = np.stack(list(table["image"]))  # [N, H, W] or [N, H, W, C] uint8
    labels = np.asarray(table["label"])
    return torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0), torch.from_numpy(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_path", required=True, help="save_to_disk folder with train/test splits")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--test_split", default="test")
    parser.add_argument("--k", type=int, nargs="+", default=[20])
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--center", action="store_true", help="subtract the mean training image first")
    parser.add_argument("--batch_size", type=int, default=1024, help="test rows per chunk")
    args = parser.parse_args()

    import datasets

    start = time.perf_counter()
    dataset = datasets.load_from_disk(args.dataset_path)
    train_x, train_y = pixels_and_labels(dataset[args.train_split])
    test_x, test_y = pixels_and_labels(dataset[args.test_split])
    if args.center:
        mean = train_x.mean(dim=0, keepdim=True)  # [1, D]
        train_x, test_x = train_x - mean, test_x - mean
    num_classes = dataset[args.train_split].features["label"].num_classes
    load_s = time.perf_counter() - start

    start = time.perf_counter()
    results = knn_classify(
        train_x,
        train_y,
        test_x,
        test_y,
        num_classes,
        ks=args.k,
        temperature=args.temperature,
        batch_size=args.batch_size,
    )
    knn_s = time.perf_counter() - start
    print(
        f"{len(train_x)} train / {len(test_x)} test images, {train_x.shape[1]} pixels, "
        f"{'mean removed' if args.center else 'raw'}; T={args.temperature}"
    )
    for k, scores in results.items():
        print(f"k={k}: top-1 {scores['top1']:.2f}%  top-5 {scores.get('top5', float('nan')):.2f}%")
    print(f"wall time: load {load_s:.1f} s, k-NN {knn_s:.1f} s ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
