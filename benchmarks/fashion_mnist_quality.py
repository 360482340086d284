#!/usr/bin/env python
"""Does pretraining learn anything? Fashion-MNIST k-NN / linear probe of EsViT vs DINO vs baselines.

Rows of the comparison (all evaluated on the 10,000 test images with the 60,000 training images as
the k-NN memory / probe training set; the labels are never used for pretraining):

* ``raw``: the flattened pixels (the floor; DESIGN.md quotes 84.6% k-NN top-1).
* ``random``: the recipe's architecture with freshly initialised weights.
* ``dino``: the recipe pretrained with the view-level task only (`--use_region_loss false`), as
  in DINO (Caron et al., ICCV 2021).
* ``esvit``: the recipe pretrained with view + region tasks (Li et al., ICLR 2022, eq. 2-4).

Both pretrainings run `run_pretraining.py --config <recipe file>` with the same number of
optimizer steps; each row records its wall time. Evaluation follows the protocols of
`run_linear_probe.py` (weighted k-NN on the pooled feature, k=20, T=0.07; the fast linear probe on
the concatenated last-4-block features, learning rate chosen on held-out training features) on
the 28-px images as they are (the equivalent of `--image_size 28 --resize_size 28`, so nothing is
cropped away). Greyscale images are repeated to 3 channels and normalised with the ImageNet
statistics, exactly as the pretraining augmentation does.

    python benchmarks/fashion_mnist_quality.py --dataset_path /tmp/fashion_mnist \\
        --recipe_config benchmarks/recipes/fashion-mnist-cpu.yaml --work_dir /tmp/fm_quality

The table is printed and written to `<results_dir>/<name>.md` and `.json`.
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
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from esvit.configuration_esvit import EsViTConfig  # noqa: E402
from esvit.evaluation.knn import knn_classify  # noqa: E402
from esvit.evaluation.linear_probe import fast_linear_probe  # noqa: E402
from esvit.images import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from esvit.modeling_esvit import EsViTModel  # noqa: E402

ROWS = ("raw", "random", "dino", "esvit")
TITLES = {
    "raw": "raw pixels (784-d)",
    "random": "same architecture, random weights",
    "dino": "view task only (DINO, `--use_region_loss false`)",
    "esvit": "view + region tasks (EsViT)",
}


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} logical CPUs ({cpu}), "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}"
    )


def load_split(dataset, split: str, max_rows: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images `[N, 28, 28]` uint8 and labels `[N]` of a `datasets` split."""
    table = dataset[split]
    if max_rows is not None:
        table = table.select(range(min(max_rows, len(table))))
    table = table.with_format("numpy")
    images = torch.from_numpy(np.stack(list(table["image"])))  # [N, H, W] uint8
    return images, torch.from_numpy(np.asarray(table["label"])).long()


def to_pixel_values(images: torch.Tensor) -> torch.Tensor:
    """uint8 `[N, H, W]` grey images -> normalised `[N, 3, H, W]`, as ToTensor + Normalize on RGB."""
    x = images.float().div(255.0)[:, None].expand(-1, 3, -1, -1)  # [N, 3, H, W]
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std


@torch.no_grad()
def backbone_features(model: EsViTModel, images: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """Pooled `[N, C]` and last-4-block `[N, D]` features of uint8 images, one pass."""
    model.eval()
    pooled, blocks = [], []
    n = min(4, model.config.num_blocks)
    for start in range(0, images.shape[0], batch_size):
        pixel_values = to_pixel_values(images[start : start + batch_size])  # [B, 3, H, W]
        # One encoder pass gives both features (`compute_features` would run the network twice).
        enc = model._encode(pixel_values, output_block_features=True)
        pooled.append(enc.pooler_output.float())  # [B, C], as compute_features(..., "pooled")
        blocks.append(torch.cat(enc.block_features[-n:], dim=-1).float())  # [B, D], as "n_last_blocks"
    return {"pooled": torch.cat(pooled), "n_last_blocks": torch.cat(blocks)}


def evaluate(train: dict, test: dict, train_y, test_y, args) -> dict:
    """k-NN on the pooled feature and the fast linear probe on the block feature."""
    start = time.perf_counter()
    knn = knn_classify(train["pooled"], train_y, test["pooled"], test_y, 10, ks=[args.k], temperature=args.temperature)[
        args.k
    ]
    probe = fast_linear_probe(
        train["n_last_blocks"],
        train_y,
        test["n_last_blocks"],
        test_y,
        10,
        lrs=args.fast_lrs,
        epochs=args.fast_epochs,
        seed=args.seed,
    )
    return {
        "knn_top1": knn["top1"],
        "knn_top5": knn["top5"],
        "linear_top1": probe.test["top1"],
        "linear_best_lr": probe.best_lr,
        "linear_sweep": {str(k): v for k, v in probe.sweep.items()},
        "knn_dim": int(train["pooled"].shape[1]),
        "linear_dim": int(train["n_last_blocks"].shape[1]),
        "probe_seconds": time.perf_counter() - start,
    }


def recipe_values(args) -> dict:
    """The argument values the pretraining rows train with: the named recipe (`--recipe`) or the
    recipe file (`--recipe_config`, which may itself select a named recipe), then `--extra_args`
    (only `--model_preset` and `--config_overrides` matter here: they fix the architecture)."""
    import shlex

    import yaml

    from esvit.training.arguments import parse_overrides
    from esvit.training.recipes import get_recipe

    if args.recipe:
        recipe = get_recipe(args.recipe)
    else:
        path = args.recipe_config
        recipe = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
        if recipe.get("recipe"):  # a file that selects a named recipe (and may override some values)
            recipe = {**get_recipe(recipe["recipe"]), **recipe}
    overrides = dict(parse_overrides(recipe.get("config_overrides")) or {})
    extra = shlex.split(args.extra_args or "")
    for flag, value in zip(extra, extra[1:]):
        if flag == "--model_preset":
            recipe["model_preset"] = value
        elif flag == "--config_overrides":
            overrides.update(parse_overrides(value) or {})
    recipe["config_overrides"] = overrides
    return recipe


def recipe_config(args) -> EsViTConfig:
    """The architecture the pretraining rows train (for the random-weights row)."""
    recipe = recipe_values(args)
    return EsViTConfig.from_preset(recipe.get("model_preset", "swin-tiny-w7"), **recipe["config_overrides"])


def pretrain(row: str, args) -> dict:
    """Run `run_pretraining.py` for a row (unless its model exists and --reuse) and time it."""
    out = Path(args.work_dir) / row
    summary_file = out / "train_summary.json"
    if args.reuse and summary_file.is_file():
        print(f"[{row}] reusing {out}", flush=True)
        return json.loads(summary_file.read_text()) | {"reused": True}
    import shlex

    source = ["--recipe", args.recipe] if args.recipe else ["--config", str(args.recipe_config)]
    command = [
        sys.executable,
        str(REPO / "run_pretraining.py"),
        *source,
        "--dataset_from_disk",
        args.dataset_path,
        "--output_dir",
        str(out),
        "--overwrite_output_dir",
        "--use_region_loss",
        "true" if row == "esvit" else "false",
        "--seed",
        str(args.seed),
    ]
    if args.max_train_steps:
        command += ["--max_train_steps", str(args.max_train_steps)]
    if args.monitor:  # the run's own k-NN monitor on 2000 test images: random weights vs trained
        command += ["--eval_dataset_name", args.dataset_path, "--eval_max_samples", "2000"]
    command += shlex.split(args.extra_args or "")
    out.mkdir(parents=True, exist_ok=True)
    print(f"[{row}] {' '.join(command)}  (log: {out / 'pretrain.log'})", flush=True)
    start = time.perf_counter()
    with open(out / "pretrain.log", "w") as log:
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    return json.loads(summary_file.read_text()) | {"wall_seconds": wall, "reused": False}


def markdown_table(results: dict, machine: str) -> str:
    lines = [
        "| features | k-NN top-1 (k=20, T=0.07) | linear top-1 (fast probe) | pretraining | wall time (pretrain + eval) |",
        "|---|---|---|---|---|",
    ]
    for row, r in results.items():
        if "pretraining" in r:
            p = r["pretraining"]
            train = (
                f"{p['global_step']} steps x {p['global_batch_size']} img, "
                f"{p['steps_per_second']:.2f} steps/s, final loss {p['final_metrics'].get('loss', float('nan')):.3f}"
            )
            if p.get("knn_top1_initial") is not None:  # the run's own monitor (2000 test images)
                train += f"; monitor k-NN {p['knn_top1_initial']:.2f} -> {p['knn_top1_final']:.2f}"
            wall = f"{p.get('wall_seconds', p['train_seconds']) / 60:.1f} min + {r['eval_seconds'] / 60:.1f} min"
        else:
            train, wall = "none", f"{r['eval_seconds'] / 60:.1f} min (eval)"
        lines.append(f"| {TITLES[row]} | {r['knn_top1']:.2f}% | {r['linear_top1']:.2f}% | {train} | {wall} |")
    lines.append("")
    lines.append(f"Machine: {machine}.")
    return "\n".join(lines)


def levers_table(path: Path) -> str:
    """Markdown table of the experiments of benchmarks/small_images_levers.py (JSON lines)."""
    lines = [
        "| suite | experiment | lever (run_pretraining.py arguments) | k-NN before -> after | images | wall | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        before, after = r.get("knn_before"), r.get("knn_after")
        if before is None or after is None:
            knn = f"{before} -> not measured" if before is not None else "not measured"
        else:
            knn = f"{before:.2f} -> {after:.2f} ({after - before:+.2f})"
        wall = f"{r['wall_seconds'] / 60:.1f} min" if r.get("wall_seconds") else "-"
        note = r.get("note", r.get("error", ""))
        lines.append(
            f"| {r.get('suite', '')} | {r['name']} | `{r['lever']}` | {knn} | {r.get('images_seen', '-')} | {wall} | {note} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset_path",
        default="/tmp/fashion_mnist",
        help="save_to_disk folder of benchmarks/prepare_fashion_mnist.py (made if missing)",
    )
    parser.add_argument("--recipe_config", type=Path, default=REPO / "benchmarks/recipes/fashion-mnist-cpu.yaml")
    parser.add_argument("--recipe", default=None, help="a named recipe instead of --recipe_config")
    parser.add_argument(
        "--extra_args",
        default="",
        help="more run_pretraining.py arguments for both pretraining rows (a lever), e.g. '--num_local_crops 0'",
    )
    parser.add_argument("--monitor", action="store_true", help="also run the pretraining k-NN monitor")
    parser.add_argument(
        "--levers_log",
        type=Path,
        default=None,
        help="JSON lines of benchmarks/small_images_levers.py whose experiments are tabled below the result",
    )
    parser.add_argument("--work_dir", default="/tmp/esvit_fashion_mnist_quality", help="pretraining outputs")
    parser.add_argument("--results_dir", type=Path, default=REPO / "benchmarks/results")
    parser.add_argument("--name", default="fashion_mnist_cpu", help="results file stem")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="pretraining steps of each run (default: the recipe's); equal for dino and esvit",
    )
    parser.add_argument("--reuse", action="store_true", help="evaluate existing runs in work_dir instead of retraining")
    parser.add_argument("--max_train_samples", type=int, default=None, help="k-NN memory / probe subset")
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--fast_lrs", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    parser.add_argument("--fast_epochs", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=1000, help="feature-extraction batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--merge_results",
        type=Path,
        nargs="*",
        default=[],
        help="JSON files of earlier runs of this script whose rows join the table",
    )
    args = parser.parse_args()

    import datasets

    if not os.path.isdir(args.dataset_path):
        subprocess.run(
            [sys.executable, str(REPO / "benchmarks/prepare_fashion_mnist.py"), "--output_dir", args.dataset_path],
            check=True,
        )
    machine = machine_description()
    print(f"machine: {machine}", flush=True)
    dataset = datasets.load_from_disk(args.dataset_path)
    train_images, train_y = load_split(dataset, "train", args.max_train_samples)
    test_images, test_y = load_split(dataset, "test", args.max_eval_samples)

    results: dict[str, dict] = {}
    for row in args.rows:
        pretraining = None
        if row == "raw":
            start = time.perf_counter()
            train = {k: train_images.flatten(1).float() / 255.0 for k in ("pooled", "n_last_blocks")}
            test = {k: test_images.flatten(1).float() / 255.0 for k in ("pooled", "n_last_blocks")}
        else:
            if row == "random":
                torch.manual_seed(args.seed)
                model = EsViTModel(recipe_config(args))
            else:
                pretraining = pretrain(row, args)
                model = EsViTModel.from_pretrained(pretraining["model_dir"])
            start = time.perf_counter()
            train = backbone_features(model, train_images, args.batch_size)
            test = backbone_features(model, test_images, args.batch_size)
        extract_seconds = time.perf_counter() - start
        result = evaluate(train, test, train_y, test_y, args)
        result["extract_seconds"] = extract_seconds
        result["eval_seconds"] = extract_seconds + result["probe_seconds"]
        if pretraining is not None:
            result["pretraining"] = pretraining
        results[row] = result
        print(
            f"[{row}] k-NN top-1 {result['knn_top1']:.2f}%, linear top-1 {result['linear_top1']:.2f}% "
            f"(extract {extract_seconds:.0f} s, probes {result['probe_seconds']:.0f} s)",
            flush=True,
        )

    for path in args.merge_results:
        for row, result in json.loads(path.read_text())["results"].items():
            results.setdefault(row, result)
    results = {row: results[row] for row in ROWS if row in results}
    table = markdown_table(results, machine)
    print(table)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Fashion-MNIST learning-quality benchmark ({args.name})\n\n"
        f"Recipe file: `{args.recipe_config.relative_to(REPO) if args.recipe_config.is_relative_to(REPO) else args.recipe_config}`; "
        f"train {len(train_y)} / test {len(test_y)} images; command: "
        f"`python benchmarks/fashion_mnist_quality.py {' '.join(sys.argv[1:])}`.\n\n"
    )
    if args.levers_log:
        table += "\n\n## Levers (k-NN monitor of each run, random weights -> trained)\n\n" + levers_table(
            args.levers_log
        )
    (args.results_dir / f"{args.name}.md").write_text(header + table + "\n")
    (args.results_dir / f"{args.name}.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "recipe_config": str(args.recipe_config),
                "recipe": args.recipe,
                "extra_args": args.extra_args,
                "num_train": len(train_y),
                "num_test": len(test_y),
                "argv": sys.argv[1:],
                "results": results,
            },
            indent=2,
            default=str,
        )
    )
    print(f"written {args.results_dir / (args.name + '.md')} and .json")


if __name__ == "__main__":
    main()
