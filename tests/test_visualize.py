"""The picture command (`python -m esvit.evaluation.visualize`) and its TensorBoard arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from esvit import EsViTConfig, EsViTModel
from esvit.evaluation import visualize
from esvit.training.pictures import log_pictures, pick_pictures
from tests.reference import tiny_config

PANEL = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = EsViTModel(EsViTConfig.from_preset("swin-micro", image_size=64, window_size=4))
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    return folder


def _images(folder, count=2):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        y, x = np.mgrid[0:40, 0:48]
        picture = np.stack([x * 5, y * 6, (x + y) * 3], axis=-1) + rng.integers(0, 40, (40, 48, 3))
        path = folder / f"img{i}.png"
        Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def test_cli_writes_one_png_per_image_and_figure(model_dir, tmp_path):
    paths = _images(tmp_path)
    out = tmp_path / "vis"
    argv = ["--model_name_or_path", str(model_dir), "--images", *map(str, paths), "--output_dir", str(out)]
    argv += ["--device", "cpu", "--panel_size", str(PANEL), "--num_local_crops", "3"]
    argv += ["--summary", str(out / "summary.png")]
    written = visualize.main(argv)

    assert sorted(written) == ["img0", "img1", "summary"]
    for name in ("img0", "img1"):
        for kind in visualize.FIGURE_KINDS:
            file = out / f"{name}_{kind}.png"
            assert file.is_file(), file
            array = np.asarray(Image.open(file).convert("RGB"))
            height, width = array.shape[:2]
            panels = {"crops": 2.5, "attention": 3, "correspondence": 2, "pca": 3}[kind]  # 3 locals: small
            assert PANEL < height < PANEL + 80, (kind, array.shape)
            assert width >= panels * PANEL, (kind, array.shape)
            assert array.std() > 10, f"{file} is (nearly) constant"
    summary = Image.open(out / "summary.png")
    # One row per image: 2 global crops, the local tiles, attention, 2 matched views, PCA.
    assert summary.width > 7 * PANEL and 2 * PANEL < summary.height < 2 * PANEL + 120


def test_tensorboard_arrays_are_uint8_hwc(model_dir, tmp_path):
    model = EsViTModel.from_pretrained(model_dir)
    images = [Image.open(p) for p in _images(tmp_path)]
    augmentation = visualize.default_augmentation(model.config, num_local_crops=2)
    figures = visualize.render_figures(model, images, augmentation, panel_size=PANEL)
    assert sorted(figures) == sorted(f"{kind}/{i}" for kind in visualize.FIGURE_KINDS for i in range(2))
    for tag, array in figures.items():
        assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3, (tag, array.shape)
        assert array.shape[0] > PANEL and array.shape[1] > 2 * PANEL
    # Same seed, same pictures; the model comes back in the mode it was in, the global RNG untouched.
    model.train()
    rng_state = torch.get_rng_state()
    again = visualize.render_figures(model, images, augmentation, panel_size=PANEL)
    assert model.training
    assert torch.equal(rng_state, torch.get_rng_state())
    assert all(np.array_equal(figures[k], again[k]) for k in figures)


def test_log_pictures_adds_images_to_tensorboard_only(model_dir, tmp_path):
    class Writer:
        def __init__(self):
            self.calls = []

        def add_image(self, tag, array, global_step=None, dataformats="CHW"):
            self.calls.append((tag, array.shape, global_step, dataformats))

        def flush(self):
            pass

    class Tracker:
        def __init__(self, name):
            self.name, self.writer = name, Writer()

    class FakeAccelerator:
        is_main_process = True

        def __init__(self, names):
            self.trackers = [Tracker(n) for n in names]

        def get_tracker(self, name, unwrap=False):
            tracker = next(t for t in self.trackers if t.name == name)
            return tracker.writer if unwrap else tracker

    model = EsViTModel.from_pretrained(model_dir)
    rows = [{"image": {"bytes": p.read_bytes(), "path": None}} for p in _images(tmp_path)]
    rows.insert(0, {"image": {"bytes": b"not an image", "path": None}})
    images = pick_pictures(rows, 1)
    assert len(images) == 1
    augmentation = visualize.default_augmentation(model.config, num_local_crops=2)

    assert not log_pictures(FakeAccelerator(["wandb"]), model, images, augmentation, step=3)
    accelerator = FakeAccelerator(["tensorboard"])
    assert log_pictures(accelerator, model, images, augmentation, step=3, kinds=("crops", "attention"))
    calls = accelerator.trackers[0].writer.calls
    assert [c[0] for c in calls] == ["pictures/crops/0", "pictures/attention/0"]
    assert all(c[2] == 3 and c[3] == "HWC" and c[1][2] == 3 for c in calls)


def test_received_attention_undoes_windows_and_shift():
    # A 4x4 map in 2x2 windows, shifted by 1: every query of every window attends to its
    # window's first token only.
    batch, height, width, ws, shift = 1, 4, 4, 2, 1
    probs = torch.zeros(batch * 4, 1, ws * ws, ws * ws)
    probs[..., 0] = 1.0
    received = visualize.received_attention(probs, batch, height, width, shift)[0]
    expected = torch.zeros(height, width)
    for r in range(0, height, ws):
        for c in range(0, width, ws):
            expected[(r + shift) % height, (c + shift) % width] = 1.0
    torch.testing.assert_close(received, expected)


def test_region_matching_and_pca():
    features = torch.randn(6, 8)
    index, similarity = visualize.match_regions(features, features[[3, 1, 0, 2, 5, 4]])
    assert index.tolist() == [2, 1, 3, 0, 5, 4]
    torch.testing.assert_close(similarity, torch.ones(6))
    colours = visualize.pca_colors(features)
    assert colours.shape == (6, 3) and colours.min() >= 0 and colours.max() <= 1
    assert np.allclose(colours.max(axis=0), 1) and np.allclose(colours.min(axis=0), 0)


@pytest.mark.parametrize("family", ["cvt", "vil"])
def test_other_families(family):
    config = tiny_config(family, image_size=64)
    model = EsViTModel(config).eval()
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    augmentation = visualize.default_augmentation(config, num_local_crops=1)
    figures = visualize.visualize_image(model, image, augmentation, panel_size=32)
    assert set(figures) == set(visualize.FIGURE_KINDS)  # tiny ViL: full attention in its last stage
    longformer = tiny_config("vil", image_size=64, vil_attention_types=("longformer",) * 4)
    assert "longformer" in visualize.attention_note(longformer)
