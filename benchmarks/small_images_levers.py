#!/usr/bin/env python
"""Which levers make pretraining learn on small images? One `run_pretraining.py` run per lever.

Each experiment is a named list of extra command-line arguments of `run_pretraining.py`, run with
its built-in k-NN monitor (`--eval_dataset_name`): the run's `train_summary.json` holds the k-NN
top-1 of the teacher's pooled feature with the initial (random) weights and after training, so
every row compares a lever with random weights of the *same* architecture at the same budget.
A row records the lever, k-NN before / after / best, images seen, wall time and the exact
command; rows are appended to a JSON-lines file, so a long sweep can be stopped and continued
(`--skip_done`).

    OMP_NUM_THREADS=1 python benchmarks/small_images_levers.py --suite tiny-default \\
        --log benchmarks/results/small_images_levers.jsonl
    OMP_NUM_THREADS=1 python benchmarks/small_images_levers.py --suite fashion-mnist \\
        --dataset_path /tmp/fashion_mnist --only bn-nolocal-sk

Run one experiment at a time with `OMP_NUM_THREADS=1` on a small shared CPU (2 intra-op threads on
a 2-core machine that other processes also use made a step ~10x slower).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = "esvit/data/fashion_mnist_500.parquet"

# The embedded 500-image sample; the monitor uses a stratified 80/20 split of it (100 queries, so
# one image is one point: compare several seeds).
TINY_DEFAULT = {
    "default": [],
    "seed1": ["--seed", "1"],
    "seed2": ["--seed", "2"],
}

# Fashion-MNIST 60k (save_to_disk folder of prepare_fashion_mnist.py); the monitor uses 2000 train
# images as the bank and 2000 test images as queries.
FASHION_MNIST = {
    "recipe": [],
    "nolocal-bn": ["--num_local_crops", "0", "--config_overrides", "head_use_bn=true"],
    "nolocal-bn-sk": [
        "--num_local_crops",
        "0",
        "--config_overrides",
        "head_use_bn=true",
        "--teacher_normalization",
        "sinkhorn_knopp",
    ],
}

SUITES = {"tiny-default": TINY_DEFAULT, "fashion-mnist": FASHION_MNIST}


def run_one(name: str, extra: list[str], args) -> dict:
    out = Path(args.work_dir) / name
    command = [sys.executable, "run_pretraining.py"]
    if args.recipe:
        command += ["--recipe", args.recipe]
    if args.dataset_path:
        command += ["--dataset_from_disk", args.dataset_path]
    command += ["--eval_dataset_name", args.eval_dataset or EMBEDDED]
    if args.eval_max_samples:
        command += ["--eval_max_samples", str(args.eval_max_samples)]
    if args.max_train_steps:
        command += ["--max_train_steps", str(args.max_train_steps)]
    command += ["--output_dir", str(out), "--overwrite_output_dir", *extra]
    out.mkdir(parents=True, exist_ok=True)
    shown = " ".join(command[1:])
    print(f"[{name}] OMP_NUM_THREADS=1 python {shown}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(out / "pretrain.log", "w") as log:
        proc = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"name": name, "error": f"exit {proc.returncode}, see {out / 'pretrain.log'}", "command": shown}
    s = json.loads((out / "train_summary.json").read_text())
    return {
        "name": name,
        "lever": " ".join(extra) or "(recipe as is)",
        "knn_before": s.get("knn_top1_initial"),
        "knn_after": s.get("knn_top1_final"),
        "knn_best": s.get("knn_top1_best"),
        "knn_best_step": s.get("knn_best_step"),
        "knn_history": s.get("knn_history"),
        "steps": s.get("global_step"),
        "images_seen": s.get("images_seen"),
        "train_seconds": round(s.get("train_seconds", float("nan")), 1),
        "wall_seconds": round(wall, 1),
        "final_loss": (s.get("final_metrics") or {}).get("loss"),
        "command": f"OMP_NUM_THREADS=1 python {shown}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), required=True)
    parser.add_argument("--only", nargs="*", help="experiment names of the suite to run (default: all)")
    parser.add_argument("--name", default=None, help="run one ad-hoc experiment of this name ...")
    parser.add_argument(
        "extra", nargs=argparse.REMAINDER, help="... with these run_pretraining.py arguments (after --)"
    )
    parser.add_argument("--recipe", default=None, help="recipe (default: tiny-cpu-default / fashion-mnist-cpu)")
    parser.add_argument("--dataset_path", default=None, help="save_to_disk folder (fashion-mnist suite)")
    parser.add_argument("--eval_dataset", default=None, help="monitor data (default: embedded or dataset_path)")
    parser.add_argument("--eval_max_samples", type=int, default=None)
    parser.add_argument("--max_train_steps", type=int, default=None)
    parser.add_argument("--work_dir", default="/tmp/esvit_levers")
    parser.add_argument("--log", type=Path, default=REPO / "benchmarks/results/small_images_levers.jsonl")
    parser.add_argument("--skip_done", action="store_true", help="skip names already in --log")
    args = parser.parse_args()
    if args.suite == "fashion-mnist":
        args.recipe = args.recipe or "fashion-mnist-cpu"
        args.dataset_path = args.dataset_path or "/tmp/fashion_mnist"
        args.eval_dataset = args.eval_dataset or args.dataset_path
        args.eval_max_samples = args.eval_max_samples or 2000
    experiments = dict(SUITES[args.suite])
    if args.name:
        experiments[args.name] = [a for a in args.extra if a != "--"]
    names = args.only or ([args.name] if args.name else list(experiments))
    done = set()
    if args.skip_done and args.log.is_file():
        done = {json.loads(line)["name"] for line in args.log.read_text().splitlines() if line.strip()}
    for name in names:
        if name in done:
            continue
        row = run_one(name, experiments[name], args)
        row["suite"] = args.suite
        print(json.dumps({k: v for k, v in row.items() if k != "knn_history"}), flush=True)
        args.log.parent.mkdir(parents=True, exist_ok=True)
        with open(args.log, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
