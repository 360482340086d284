"""run_linear_probe.py on imperfect data: broken images, EXIF orientation, no evaluation split.

The script is run in-process (`main(argv)`, the same code path as the command line; the 2-process
command-line run is in tests/test_probe_e2e.py) on a tiny EsViT saved with `save_pretrained` and
real image folders written here.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "run_linear_probe.py"
IMAGE_SIZE = 32


# ------------------------------------------------------------------------------------ image files
def _good_image(path: Path, rng: np.random.Generator, base: int) -> None:
    pixels = np.clip(base + rng.normal(0, 30, (36, 40, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def _truncated_jpeg(path: Path, rng: np.random.Generator) -> None:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _random_bytes(path: Path, rng: np.random.Generator) -> None:
    path.write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims `width` x `height` pixels; its data holds almost nothing."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def _class_folders(root: Path, per_class: int, rng: np.random.Generator) -> None:
    for cls, base in (("dark", 60), ("bright", 190)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _good_image(root / cls / f"{i:02d}.png", rng, base)


# -------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from esvit import EsViTConfig, EsViTModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("robust") / "model"
    EsViTModel(EsViTConfig.from_preset("swin-micro", image_size=IMAGE_SIZE)).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def probe():
    """The script's `main`, loaded from the file; accelerate's process-wide state reset after each run."""
    from accelerate.state import AcceleratorState, GradientState

    spec = importlib.util.spec_from_file_location("run_linear_probe", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("run_linear_probe", script)  # its dataclasses resolve annotations through it
    spec.loader.exec_module(script)

    def run(argv: list[str]) -> dict:
        try:
            return script.main(argv)
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()

    return run


def _args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path",
        str(model_dir),
        "--dataset_name",
        str(data),
        "--cache_dir",
        str(out.parent / f"{out.name}_cache"),
        "--output_dir",
        str(out),
        "--cpu",
        "--per_device_batch_size",
        "8",
        "--dataloader_num_workers",
        "0",
        "--nb_knn",
        "5",
        "--update_model_card",
        "false",
        *extra,
    ]


# ----------------------------------------------------------------------------------------- tests
def test_bad_images_are_skipped_named_and_counted(model_dir, probe, tmp_path, caplog):
    rng = np.random.default_rng(0)
    data = tmp_path / "images"
    _class_folders(data / "train", 10, rng)
    _class_folders(data / "val", 4, rng)
    _truncated_jpeg(data / "train" / "dark" / "truncated.jpg", rng)
    _random_bytes(data / "train" / "bright" / "garbage.jpg", rng)
    _png_claiming(data / "train" / "dark" / "bomb.png", 8000, 8000)  # 64 Mpx > the 40 Mpx default cap
    _random_bytes(data / "val" / "bright" / "noise.jpg", rng)
    out = tmp_path / "out"
    args = ["--protocol", "all", "--max_bad_fraction", "0.2", "--save_features", "--fast_epochs", "3"]
    args += ["--fast_lrs", "0.1", "--epochs", "1"]

    with caplog.at_level(logging.INFO):
        results = probe(_args(model_dir, data, out, *args))

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["skipped_images"] == results["skipped_images"] == {"train": 3, "eval": 1}
    bad_train = ["bomb.png", "garbage.jpg", "truncated.jpg"]
    names = on_disk["skipped_image_names"]  # "<path> (row <i>)"
    assert sorted(Path(n.split(" (row")[0]).name for n in names["train"]) == bad_train
    assert [Path(n.split(" (row")[0]).name for n in names["eval"]] == ["noise.jpg"]
    assert on_disk["num_train"] == 20 and on_disk["num_eval"] == 8
    # Every protocol ran on the decodable images only.
    assert {"knn", "fast_linear", "linear"} <= set(on_disk)
    assert on_disk["linear"]["history"][0]["train_loss"] > 0
    # The log names each file with the reason, and sums up per split.
    log = caplog.text
    for name in ("truncated.jpg", "garbage.jpg", "bomb.png", "noise.jpg"):
        assert f"{name} (row " in log
    assert "exceeds the cap" in log
    assert "3 of 23 images cannot be decoded and are skipped" in log

    # Features are kept for the decodable rows only, with their labels, in dataset order.
    from safetensors.torch import load_file

    from esvit.evaluation.data import load_labelled_split

    saved = load_file(out / "features_train.safetensors")
    split = load_labelled_split(str(data), "train", cache_dir=str(tmp_path / "out_cache"))
    files = [Path(value["path"]).name for value in split.dataset["image"]]
    expected_rows = [i for i, name in enumerate(files) if name not in bad_train]
    assert saved["rows"].tolist() == expected_rows
    assert saved["labels"].tolist() == [split.dataset[i]["label"] for i in expected_rows]
    assert saved["pooled"].shape[0] == 20 and torch.isfinite(saved["pooled"]).all()


def test_mostly_broken_split_aborts(model_dir, probe, tmp_path):
    from esvit.evaluation.data import TooManyUndecodableImages

    rng = np.random.default_rng(1)
    data = tmp_path / "images"
    _class_folders(data / "train", 2, rng)
    _class_folders(data / "val", 2, rng)
    for cls in ("dark", "bright"):
        for i in range(3):
            _random_bytes(data / "train" / cls / f"broken{i}.jpg", rng)
    with pytest.raises(TooManyUndecodableImages) as info:
        probe(_args(model_dir, data, tmp_path / "out", "--protocol", "knn"))
    message = str(info.value)
    assert "6 of 10 images (60.0%) of the train split 'train' cannot be decoded" in message
    assert "--max_bad_fraction 0.01" in message and "broken0.jpg (row" in message
    assert not (tmp_path / "out" / "results.json").exists()

    # --max_image_pixels reaches the decoder: 40x36 images are over a 1000-pixel cap.
    clean = tmp_path / "clean"
    _class_folders(clean / "train", 2, rng)
    _class_folders(clean / "val", 2, rng)
    with pytest.raises(TooManyUndecodableImages, match="4 of 4 images"):
        probe(_args(model_dir, clean, tmp_path / "capped", "--protocol", "linear", "--max_image_pixels", "1000"))


def test_exif_rotated_jpeg_is_upright_in_the_evaluation_dataset(tmp_path):
    from esvit.evaluation.data import LabelledImageDataset, build_eval_transform, load_labelled_split

    # Stored 40 wide x 24 high with a bright left edge; orientation 6 = "rotate 90° clockwise to view".
    stored = np.zeros((24, 40, 3), dtype=np.uint8)
    stored[:, :8] = 255
    stored[:4, :, 1] = 200
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "train" / "a").mkdir(parents=True)
    path = tmp_path / "train" / "a" / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)
    (tmp_path / "train" / "b").mkdir()
    Image.fromarray(stored).save(tmp_path / "train" / "b" / "plain.png")

    split = load_labelled_split(str(tmp_path), "train", cache_dir=str(tmp_path / "cache"))
    row = next(i for i in range(len(split)) if split.dataset[i]["image"]["path"].endswith("rotated.jpg"))
    as_array = LabelledImageDataset(split, lambda image: torch.from_numpy(np.array(image)))[row]
    assert as_array["valid"]
    upright = as_array["pixel_values"].numpy()
    with Image.open(path) as raw:
        assert raw.size == (40, 24) and raw.getexif()[0x0112] == 6
        expected = np.rot90(np.asarray(raw.convert("RGB")), k=-1)  # the decoded pixels, turned clockwise
    assert upright.shape == (40, 24, 3)
    np.testing.assert_array_equal(upright, expected)
    assert upright[:8].mean() > 200 and upright[-8:].mean() < 60  # the bright left edge is now on top
    # The model's view is the same upright image.
    pixels = LabelledImageDataset(split, build_eval_transform(IMAGE_SIZE))[row]["pixel_values"]
    torch.testing.assert_close(pixels, build_eval_transform(IMAGE_SIZE)(Image.fromarray(expected)))


def test_folder_without_eval_split_is_held_out_from_train(model_dir, probe, tmp_path, caplog):
    rng = np.random.default_rng(2)
    data = tmp_path / "classes"  # <class>/<image>, no split folders
    _class_folders(data, 8, rng)

    explicit = probe(_args(model_dir, data, tmp_path / "explicit", "--protocol", "knn", "--train_val_split", "0.25"))
    assert explicit["eval_split"] == "train_holdout_0.25" and explicit["train_val_split"] == 0.25
    assert explicit["num_train"] == 12 and explicit["num_eval"] == 4  # 2 of each class's 8
    assert explicit["class_names"] == ["bright", "dark"] and set(explicit["knn"]["results"]) == {"5"}

    with caplog.at_level(logging.INFO):
        default = probe(_args(model_dir, data, tmp_path / "default", "--protocol", "knn"))
    assert "--train_val_split 0.15" in caplog.text
    assert default["eval_split"] == "train_holdout_0.15" and default["train_val_split"] == 0.15
    assert default["num_train"] == 14 and default["num_eval"] == 2  # round(0.15 * 8) = 1 per class


def test_hold_out_is_stratified_seeded_and_disjoint(tmp_path):
    from esvit.evaluation.data import hold_out, load_labelled_split

    rng = np.random.default_rng(3)
    _class_folders(tmp_path / "data", 10, rng)
    split = load_labelled_split(str(tmp_path / "data"), "train", cache_dir=str(tmp_path / "cache"))
    train, held = hold_out(split, 0.3, seed=5)
    paths = lambda s: [v["path"] for v in s.dataset[s.image_column]]  # noqa: E731
    assert sorted(paths(train) + paths(held)) == sorted(paths(split)) and not set(paths(train)) & set(paths(held))
    assert sorted(held.dataset[held.label_column]) == [0, 0, 0, 1, 1, 1]
    assert paths(hold_out(split, 0.3, seed=5)[1]) == paths(held) != paths(hold_out(split, 0.3, seed=6)[1])
    assert paths(train) == sorted(paths(train), key=paths(split).index)  # original order kept
    with pytest.raises(ValueError, match="train_val_split"):
        hold_out(split, 1.5)
