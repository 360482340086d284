#!/usr/bin/env python
"""A user's own folder, as the README's first run uses it: does the small-image recipe learn, and keep learning?

Writes a folder of unlabelled PNGs (`train/`, no sub-folders) and a labelled folder of class
sub-folders (`labelled/`) from images the project does not train its benchmarks on (by default the
10,000 Fashion-MNIST *test* images of Debian's `dataset-fashion-mnist`: 3,000 unlabelled, 2,000
labelled), then runs, exactly as the README shows,

    python run_pretraining.py --train_dir train --eval_dir labelled --output_dir run_<steps> \\
        [--recipe small-images-cpu] --max_train_steps <steps>

for each `--steps` value, and reports the run's own k-NN monitor (leave-one-out over the labelled
images, teacher pooled feature, k = 20): random initial weights -> after training. The question is
the README's promise: above random weights after a few minutes, and still above after 3x longer.

    OMP_NUM_THREADS=1 python benchmarks/own_folder_quality.py --work_dir /tmp/own_folder --steps 300 900
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from prepare_fashion_mnist import CLASS_NAMES, DEBIAN_DIR, read_idx  # noqa: E402


def write_folders(data_dir: str, root: Path, num_train: int, num_labelled: int, seed: int) -> None:
    """`root/train/*.png` (unlabelled) and `root/labelled/<class>/*.png`, disjoint images."""
    images = read_idx(f"{data_dir}/t10k-images-idx3-ubyte.gz")  # [N, 28, 28] uint8
    labels = read_idx(f"{data_dir}/t10k-labels-idx1-ubyte.gz")
    order = np.random.default_rng(seed).permutation(len(images))
    (root / "train").mkdir(parents=True, exist_ok=True)
    for i in order[:num_train]:
        Image.fromarray(images[i]).save(root / "train" / f"{i:05d}.png")
    for i in order[num_train : num_train + num_labelled]:
        folder = root / "labelled" / CLASS_NAMES[labels[i]].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=DEBIAN_DIR, help="Fashion-MNIST IDX files")
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/esvit_own_folder"))
    parser.add_argument("--num_train", type=int, default=3000)
    parser.add_argument("--num_labelled", type=int, default=2000)
    parser.add_argument("--steps", type=int, nargs="+", default=[300, 900])
    parser.add_argument("--recipe", default=None, help="None: what the script picks on this machine")
    parser.add_argument("--extra_args", default="", help="more run_pretraining.py arguments")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    if not (args.work_dir / "labelled").is_dir():
        write_folders(args.data_dir, args.work_dir, args.num_train, args.num_labelled, args.seed)
    rows = []
    for steps in args.steps:
        out = args.work_dir / f"run_{steps}"
        command = [sys.executable, str(REPO / "run_pretraining.py"), "--train_dir", str(args.work_dir / "train"),
                   "--eval_dir", str(args.work_dir / "labelled"), "--output_dir", str(out), "--overwrite_output_dir",
                   "--max_train_steps", str(steps), "--seed", str(args.seed),
                   *(["--recipe", args.recipe] if args.recipe else []), *args.extra_args.split()]  # fmt: skip
        print(" ".join(command), flush=True)
        start = time.perf_counter()
        with open(args.work_dir / f"run_{steps}.log", "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
        summary = json.loads((out / "train_summary.json").read_text())
        rows.append({"steps": steps, "wall_seconds": time.perf_counter() - start, **{
            k: summary.get(k) for k in ("recipe", "knn_top1_initial", "knn_top1_final", "knn_top1_best",
                                        "knn_history", "knn_data", "images_seen", "steps_per_second")}})  # fmt: skip
    machine = (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, Python {platform.python_version()}"
    )
    print("\n| steps | images | k-NN random weights -> trained (gain) | best | wall |\n|---|---|---|---|---|")
    for r in rows:
        gain = r["knn_top1_final"] - r["knn_top1_initial"]
        print(f"| {r['steps']} | {r['images_seen']} | {r['knn_top1_initial']:.2f}% -> {r['knn_top1_final']:.2f}% "
              f"({gain:+.2f}) | {r['knn_top1_best']:.2f}% | {r['wall_seconds'] / 60:.1f} min |")  # fmt: skip
    print(f"\nRecipe {rows[0]['recipe']}; monitor: {rows[0]['knn_data']}; machine: {machine}.")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "argv": sys.argv[1:], "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
