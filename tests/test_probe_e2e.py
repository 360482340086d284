"""run_linear_probe.py end to end on a tiny EsViT and a tiny image folder, in 1 and 2 processes.

The 2-process run is a real gloo job on the CPU (`accelerate launch --multi_gpu ... --cpu`); its
features, k-NN and fast-probe results must equal the 1-process run's, which shows that the
distributed extraction neither repeats nor drops nor reorders images. Each split holds one file
that is not an image: both runs must skip the same row, with its label.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "run_linear_probe.py"
IMAGE_SIZE = 32
MODES = ("RGB", "L", "RGBA", "P")  # the folder mixes modes; everything must reach the model as RGB


def _write_image_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 12), ("val", 6)):
        for cls, base in (("dark", 60), ("bright", 190)):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(base + rng.normal(0, 40, (40, 36, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).convert(MODES[i % len(MODES)]).save(folder / f"{i:02d}.png")
    # Undecodable: the last train row, and a row in the middle of the validation split.
    (root / "train" / "dark" / "zz_broken.jpg").write_bytes(b"not a jpeg" * 50)
    (root / "val" / "bright" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], num_processes: int, timeout: int = 240) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if num_processes == 1:
        command = [sys.executable, str(SCRIPT), *args]
    else:
        # `--num_processes 2 --cpu` would silently start ONE process; `--multi_gpu` with the script's
        # Accelerator(cpu=True) gives a real 2-process gloo group on a CPU-only machine.
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(num_processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
            str(SCRIPT),
            *args,
        ]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (
        f"{' '.join(command)}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-6000:]}"
    )


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from esvit import EsViTConfig, EsViTModel

    root = tmp_path_factory.mktemp("probe")
    torch.manual_seed(0)
    model = EsViTModel(EsViTConfig.from_preset("swin-micro", image_size=IMAGE_SIZE)).eval()
    model.save_pretrained(root / "model")
    _write_image_folder(root / "images")
    return root


def _common_args(root: Path, out: str, protocol: str) -> list[str]:
    return [
        "--model_name_or_path",
        str(root / "model"),
        "--dataset_name",
        str(root / "images"),
        "--cache_dir",
        str(root / "cache"),
        "--output_dir",
        str(root / out),
        "--protocol",
        protocol,
        "--cpu",
        "--per_device_batch_size",
        "5",
        "--dataloader_num_workers",
        "0",
        "--save_features",
        "--nb_knn",
        "1",
        "5",
        "10",
        "100",
        "--fast_epochs",
        "15",
        "--fast_lrs",
        "0.001",
        "1.0",
        "--holdout_fraction",
        "0.25",
        "--epochs",
        "2",
        "--max_bad_fraction",
        "0.1",
    ]


@pytest.mark.slow
def test_one_and_two_processes_agree(tiny_setup):
    from safetensors.torch import load_file

    root = tiny_setup
    _run(_common_args(root, "one", "knn,fast_linear"), num_processes=1)
    _run(_common_args(root, "two", "all"), num_processes=2)
    one = json.loads((root / "one" / "results.json").read_text())
    two = json.loads((root / "two" / "results.json").read_text())
    assert one["num_processes"] == 1 and two["num_processes"] == 2  # the launch really used 2 processes
    assert one["num_train"] == 24 and one["num_eval"] == 12 and one["eval_split"] == "validation"
    assert one["skipped_images"] == two["skipped_images"] == {"train": 1, "eval": 1}
    assert one["skipped_image_names"] == two["skipped_image_names"]
    assert one["skipped_image_names"]["eval"][0].endswith("zz_broken.png (row 6)")

    # Features: same rows, same order, no duplicates (24 train / 12 eval rows in batches of 5 leave
    # uneven last batches, which the sampler pads with repeated images).
    for split in ("train", "eval"):
        f1 = load_file(root / "one" / f"features_{split}.safetensors")
        f2 = load_file(root / "two" / f"features_{split}.safetensors")
        assert set(f1) == {"pooled", "n_last_blocks", "labels", "rows"}
        assert f1["labels"].tolist() == f2["labels"].tolist() and f1["rows"].tolist() == f2["rows"].tolist()
        expected_rows = list(range(24)) if split == "train" else [*range(6), *range(7, 13)]
        assert f1["rows"].tolist() == expected_rows
        for kind in ("pooled", "n_last_blocks"):
            torch.testing.assert_close(f2[kind], f1[kind], rtol=1e-5, atol=1e-5)
    # ... and in dataset order: recompute a few rows directly.
    from esvit import EsViTModel
    from esvit.evaluation.data import build_eval_transform, load_labelled_split
    from esvit.images import to_rgb

    split = load_labelled_split(str(root / "images"), "train", cache_dir=str(root / "cache"))
    model = EsViTModel.from_pretrained(root / "model").eval()
    transform = build_eval_transform(IMAGE_SIZE)
    rows = [0, 7, 13, 23]
    pixels = torch.stack([transform(to_rgb(split.dataset[i]["image"])) for i in rows])
    with torch.no_grad():
        direct = model.get_n_last_blocks_features(pixels, 4)
    f2 = load_file(root / "two" / "features_train.safetensors")
    torch.testing.assert_close(f2["n_last_blocks"][rows], direct, rtol=1e-4, atol=1e-5)
    assert f2["labels"][rows].tolist() == [split.dataset[i]["label"] for i in rows]
    assert f2["n_last_blocks"].shape == (24, model.config.n_last_blocks_dim(4))

    # Results: k-NN (k=100 > 24 train images is skipped) and the fast probe are identical.
    assert set(one["knn"]["results"]) == {"1", "5", "10"}
    assert one["knn"] == two["knn"]
    for key in ("top1", "best_lr", "sweep_heldout_top1"):
        assert one["fast_linear"][key] == two["fast_linear"][key]
    # Two bright/dark blobs: even random features separate them.
    assert one["knn"]["results"]["5"]["top1"] > 80.0
    # The full protocol ran under DDP and produced a score.
    assert two["linear"]["global_batch_size"] == 10 and len(two["linear"]["history"]) == 2
    assert 0.0 <= two["linear"]["top1"] <= 100.0 and "top5" not in two["linear"]
    assert (root / "two" / "linear_classifier.safetensors").is_file()

    # The model card of the local folder lists each protocol once, even after two runs.
    from huggingface_hub import ModelCard

    card = ModelCard.load(root / "model" / "README.md")
    names = [r.metric_name for r in card.data.eval_results]
    assert len(names) == len(set(names)) == 3 + 1 + 1, names
    assert any(n.startswith("k-NN top-1 (k=10, T=0.07") for n in names)
    assert any("full protocol" in n for n in names)
    assert {r.dataset_type for r in card.data.eval_results} == {"images"}


def test_eval_data_mode_handling_and_sizes(tiny_setup):
    from esvit.evaluation.data import (
        LabelledImageDataset,
        build_eval_transform,
        build_train_transform,
        collate_labelled,
        load_labelled_split,
    )
    from esvit.images import to_rgb

    split = load_labelled_split(
        str(tiny_setup / "images"),
        ("validation", "test"),
        cache_dir=str(tiny_setup / "cache"),
        class_names=["bright", "dark"],
    )
    assert split.name == "validation" and split.num_classes == 2 and len(split) == 13
    # Images stay undecoded (decoded by esvit.images.decode_image in the torch dataset).
    paths = [split.dataset[i]["image"]["path"] for i in range(len(split))]
    assert {Image.open(p).mode for p in paths if not p.endswith("zz_broken.png")} == set(MODES)
    batch = collate_labelled([LabelledImageDataset(split, build_eval_transform(IMAGE_SIZE))[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["valid"].all()
    broken = LabelledImageDataset(split, build_eval_transform(IMAGE_SIZE))[6]  # zz_broken.png
    assert not broken["valid"] and broken["pixel_values"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert build_train_transform(24)(to_rgb(split.dataset[0]["image"])).shape == (3, 24, 24)
    # 16-bit grey images are rescaled, not clipped at 255 as PIL's own conversion would.
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_rgb(sixteen).getextrema() == ((255, 255),) * 3
    assert to_rgb(Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))).getpixel((0, 0)) == (128, 128, 128)
    with pytest.raises(ValueError, match="none of the splits"):
        load_labelled_split(str(tiny_setup / "images"), "holdout", cache_dir=str(tiny_setup / "cache"))
