"""Pretraining driver: data loading (`esvit.training.data`) and `run_pretraining.py` end to end.

The end-to-end tests run the real script in subprocesses on a 20-image slice of the embedded
Fashion-MNIST sample with a micro Swin, and compare final teacher weights and loss centres:
* 1 process x batch 4 (the reference) = 2 processes x batch 2 (a real 2-process gloo run)
  = 1 process x batch 2 x 2 accumulation steps;
* a run resumed from a mid-epoch checkpoint = the uninterrupted reference.
They use drop-path 0 and the content-seeded augmentation, so every run sees the same crops.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from esvit.images import decode_image
from esvit.training.data import (
    EMBEDDED_DATASET,
    DataArguments,
    MultiCropCollator,
    build_augmentation,
    build_pretraining_loader,
    load_pretraining_images,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "run_pretraining.py"
NUM_IMAGES = 20  # 5 batches of 4: the 6-step runs cross an epoch boundary
TINY_AUG = dict(global_crop_size=64, local_crop_size=32, num_local_crops=2, blur_probs=[0.0, 0.0, 0.0])


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_home")


@pytest.fixture(scope="module")
def small_parquet(tmp_path_factory) -> Path:
    """The first NUM_IMAGES images of the embedded sample."""
    path = tmp_path_factory.mktemp("data") / "small.parquet"
    sample = datasets.load_dataset("parquet", data_files=str(EMBEDDED_DATASET), split="train")
    sample.select(range(NUM_IMAGES)).to_parquet(str(path))
    return path


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _env(hf_home: Path) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(args: list[str], processes: int = 1) -> list[str]:
    """The command line of run_pretraining.py, under a real multi-process CPU `accelerate launch`
    for several processes (see DESIGN.md: --num_processes N --cpu alone starts one)."""
    if processes == 1:
        return [sys.executable, str(SCRIPT), *args]
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(SCRIPT), *args, "--cpu",
    ]  # fmt: skip


def run_script(args: list[str], hf_home: Path, processes: int = 1, timeout: int = 240) -> dict:
    """Run run_pretraining.py (under `accelerate launch` for several processes); return its summary."""
    command = launch_command(args, processes)
    result = subprocess.run(command, cwd=REPO_ROOT, env=_env(hf_home), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"run failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    output_dir = Path(args[args.index("--output_dir") + 1])
    return json.loads((output_dir / "train_summary.json").read_text())


def tiny_run_args(data: Path | list[str], output_dir: Path, **changes) -> list[str]:
    values = {
        "train_files": [str(f) for f in data] if isinstance(data, list) else str(data),
        "output_dir": str(output_dir),
        "model_preset": "swin-micro",
        "config_overrides": '{"image_size": 64, "window_size": 4, "drop_path_rate": 0.0}',
        "global_crop_size": "64",
        "local_crop_size": "32",
        "num_local_crops": "2",
        "blur_probs": ["0", "0", "0"],
        "per_device_train_batch_size": "4",
        "max_train_steps": "6",
        "learning_rate": "0.02",
        "warmup_steps": "2",
        "warmup_teacher_temp": "0.04",
        "teacher_temp": "0.06",
        "warmup_teacher_temp_steps": "3",
        "freeze_last_layer_steps": "1",
        "momentum_teacher": "0.9",
        "dataloader_num_workers": "0",
        "logging_steps": "1",
        "report_to": "none",
        "seed": "3",
        "cpu": "true",
        "record_sample_keys": "true",
        # KoLeo (on in the small-image recipe this run falls back to on CPU) depends on how the
        # batch is split over processes and micro-batches; these runs check the exact equivalences
        "koleo_loss_weight": "0",
        **changes,
    }
    args = []
    for key, value in values.items():
        if value is None:
            continue
        args.append(f"--{key}")
        args.extend(value if isinstance(value, list) else [value])
    return args


def teacher_state(output_dir: Path) -> dict[str, torch.Tensor]:
    """Final teacher weights (backbone + heads) and loss centres of a run."""
    state = load_file(str(output_dir / "pretraining" / "model.safetensors"))
    centres = load_file(str(output_dir / "pretraining" / "esvit_loss.safetensors"))
    state.update({f"loss.{k}": v for k, v in centres.items()})
    return state


def assert_same_state(actual: dict, expected: dict, **tolerance) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], msg=lambda m, k=key: f"{k}: {m}", **tolerance)


def keys_by_step(output_dir: Path, rank: int) -> dict[int, list[int]]:
    entries = json.loads((output_dir / "sample_keys" / f"rank{rank}.json").read_text())
    steps: dict[int, list[int]] = {}
    for step, _epoch, key in entries:
        steps.setdefault(step, []).append(key)
    return steps


@pytest.fixture(scope="module")
def reference_run(small_parquet, hf_home, tmp_path_factory) -> Path:
    """1 process, batch 4, 6 steps (5 per epoch), a checkpoint after every step (the last 3 kept)."""
    output_dir = tmp_path_factory.mktemp("reference")
    summary = run_script(
        tiny_run_args(small_parquet, output_dir, checkpointing_steps="1", checkpoints_total_limit="3"), hf_home
    )
    assert summary["num_processes"] == 1 and summary["global_step"] == 6
    return output_dir


# --------------------------------------------------------------------------------- data module
def _loader(dataset, batch_size: int, accelerator=None, seed: int = 0):
    from accelerate import Accelerator

    args = DataArguments(**TINY_AUG)
    collator = MultiCropCollator(build_augmentation(args), seed=seed)
    return build_pretraining_loader(
        dataset,
        accelerator=accelerator or Accelerator(cpu=True),
        collator=collator,
        batch_size=batch_size,
        num_workers=0,
        seed=seed,
    )


def _crops_by_key(loader, epoch: int = 0) -> dict[int, list[torch.Tensor]]:
    found = {}
    for batch in loader.epoch(epoch):
        for i, key in enumerate(batch["keys"].tolist()):
            assert key not in found, "an image came twice in one epoch"
            found[key] = [crop[i] for crop in batch["crops"]]
    return found


def test_streaming_and_map_style_feed_the_same_crops(small_parquet):
    args = dict(train_files=[str(small_parquet)], **TINY_AUG)
    map_style = load_pretraining_images(DataArguments(**args))
    stream = load_pretraining_images(DataArguments(**args, streaming=True))
    assert isinstance(map_style, datasets.Dataset) and isinstance(stream, datasets.IterableDataset)
    from_map = _crops_by_key(_loader(map_style, batch_size=5))
    from_stream = _crops_by_key(_loader(stream, batch_size=5))
    assert len(from_map) == NUM_IMAGES
    assert from_map.keys() == from_stream.keys()
    for key, crops in from_map.items():
        for a, b in zip(crops, from_stream[key]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # A new epoch gives new crops of the same images.
    next_epoch = _crops_by_key(_loader(map_style, batch_size=5), epoch=1)
    key = next(iter(from_map))
    assert not torch.equal(next_epoch[key][0], from_map[key][0])


@pytest.mark.parametrize("source", ["one arrow file", "two arrow files", "save_to_disk folder"])
def test_stream_split_by_node_is_disjoint_and_complete(small_parquet, tmp_path, source):
    """Each of 2 processes reads its own images, together all of them ("examples" and "shards"
    strategies of `split_dataset_by_node`). Arrow sources also avoid the 5-s pause that `datasets`
    makes when a streamed parquet file closes."""
    table = datasets.load_dataset("parquet", data_files=str(small_parquet), split="train")
    table.save_to_disk(str(tmp_path / "saved"), num_shards=2 if source == "two arrow files" else 1)
    if source == "save_to_disk folder":
        data_source = dict(dataset_from_disk=str(tmp_path / "saved"))
    else:
        data_source = dict(train_files=sorted(str(p) for p in (tmp_path / "saved").glob("*.arrow")))
    seen = []
    for rank in range(2):
        stream = load_pretraining_images(DataArguments(**data_source, streaming=True, **TINY_AUG))
        fake = SimpleNamespace(process_index=rank, num_processes=2, device=torch.device("cpu"))
        seen.append(set(_crops_by_key(_loader(stream, batch_size=1, accelerator=fake))))
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == NUM_IMAGES
    assert abs(len(seen[0]) - len(seen[1])) <= 1


def test_corrupt_images_are_skipped_counted_and_named(tmp_path, caplog):
    good = _png(Image.new("RGB", (40, 40), (200, 10, 10)))
    rows = [
        {"bytes": good, "path": None},
        {"bytes": good[: len(good) // 2], "path": None},  # truncated PNG
        {"bytes": b"definitely not an image", "path": "broken/garbage.jpg"},
        {"bytes": _png(Image.new("L", (30, 50), 90)), "path": None},
    ]
    dataset = datasets.Dataset.from_dict({"image": rows}, features=datasets.Features(image=datasets.Image()))
    path = tmp_path / "with_corrupt.parquet"
    dataset.to_parquet(str(path))
    loaded = load_pretraining_images(DataArguments(train_files=[str(path)], **TINY_AUG))
    collator = MultiCropCollator(build_augmentation(DataArguments(**TINY_AUG)), seed=0)
    with caplog.at_level(logging.WARNING, logger="esvit.training.data"):
        batch = collator([{"image": loaded[i]["image"], "row": i} for i in range(len(loaded))])
    assert batch["num_skipped"] == 2
    assert batch["skipped"] == ["row 1", "broken/garbage.jpg (row 2)"]
    assert [tuple(c.shape) for c in batch["crops"]] == [(2, 3, 64, 64)] * 2 + [(2, 3, 32, 32)] * 2
    assert "row 1" in caplog.text and "broken/garbage.jpg" in caplog.text


def test_image_folder_with_a_corrupt_file_trains_on_the_rest(tmp_path):
    for i, mode in enumerate(["RGB", "L", "RGBA", "P"]):
        Image.new(mode, (36, 36)).save(tmp_path / f"img{i}.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    loader = _loader(load_pretraining_images(DataArguments(train_dir=str(tmp_path), **TINY_AUG)), batch_size=5)
    (batch,) = list(loader.epoch(0))
    assert batch["num_skipped"] == 1 and "bad.png" in batch["skipped"][0]
    assert batch["crops"][0].shape == (4, 3, 64, 64)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "I", "F", "1", "LA"])
def test_every_image_mode_decodes_to_rgb(mode):
    image = Image.new(mode, (12, 9))
    fmt = "TIFF" if mode in ("CMYK", "F", "I") else "PNG"
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    decoded = decode_image(buffer.getvalue())
    assert decoded.mode == "RGB" and decoded.size == (12, 9)


# ------------------------------------------------------------------------------ argument parsing
def _import_script():
    sys.path.insert(0, str(REPO_ROOT))
    try:
        import run_pretraining
    finally:
        sys.path.remove(str(REPO_ROOT))
    return run_pretraining


def _image_folder(root) -> str:
    """A folder with one image: local sources are checked when the arguments are parsed."""
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(root / "one.png")
    return str(root)


def test_argument_precedence_recipe_file_command_line(tmp_path):
    from esvit.training.arguments import parse_arguments

    train_dir = _image_folder(tmp_path / "train")
    config = tmp_path / "run.yaml"
    config.write_text(
        f"recipe: esvit-swin-tiny-imagenet\ntrain_dir: {train_dir}\nper_device_train_batch_size: 16\n"
        "config_overrides:\n  drop_path_rate: 0.2\n"
    )
    model, data, train = parse_arguments([str(config), "--num_train_epochs", "7"])
    assert train.recipe == "esvit-swin-tiny-imagenet" and train.config == str(config)
    assert model.model_preset == "swin-tiny-w7"  # recipe
    assert train.teacher_temp == 0.07 and train.warmup_teacher_temp_epochs == 30  # recipe
    assert train.per_device_train_batch_size == 16 and data.train_dir == train_dir  # file
    # the file's overrides merge into the recipe's, key by key
    assert model.config_overrides == {"head_out_dim": 65536, "head_norm_last_layer": False, "drop_path_rate": 0.2}
    assert train.num_train_epochs == 7  # command line
    assert model.build_config().drop_path_rate == 0.2

    json_config = tmp_path / "run.json"
    json_config.write_text(json.dumps({"dataset_name": "some/dataset", "streaming": True}))
    model, data, train = parse_arguments(["--config", str(json_config), "--config_overrides", "image_size=96"])
    # no recipe named: none on a GPU machine, the small-image recipe on a CPU-only one
    expected_recipe = None if torch.cuda.is_available() else "small-images-cpu"
    assert data.streaming and train.recipe == expected_recipe and model.config_overrides["image_size"] == 96
    # the command line merges too: a recipe's image size survives an unrelated override
    model, _, _ = parse_arguments(["--recipe", "fashion-mnist-cpu", "--config_overrides", "window_size=5"])
    assert model.config_overrides["window_size"] == 5 and model.build_config().image_size == 28

    model, data, train = parse_arguments([])  # no data source: the embedded default
    assert train.recipe == "tiny-cpu-default" and data.uses_embedded_dataset

    config.write_text("learning_rat: 0.1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        parse_arguments([str(config)])


def test_every_recipe_parses(tmp_path):
    from esvit.training.arguments import parse_arguments
    from esvit.training.recipes import RECIPES

    for name in RECIPES:
        model, _, _ = parse_arguments(["--recipe", name, "--train_dir", _image_folder(tmp_path)])
        config = model.build_config()
        if name.startswith("esvit-"):  # the released ImageNet runs: four stages at 224 px
            assert config.num_stages == 4 and config.image_size == 224, name
        else:  # the small-image recipes: 28-px images
            assert config.image_size == 28, name


def test_collapse_monitor_warns_once_when_the_entropy_stays_at_an_extreme(caplog):
    from esvit.training.monitoring import CollapseMonitor

    log_k = torch.log(torch.tensor(1024.0)).item()
    monitor = CollapseMonitor(out_dim=1024, patience_steps=30)
    with caplog.at_level(logging.WARNING):
        for step in range(1, 4):  # healthy entropy: never a warning
            monitor.update(0.5 * log_k, steps=10, global_step=10 * step)
        assert "collapse" not in caplog.text
        monitor.update(0.999 * log_k, steps=10, global_step=40)
        monitor.update(0.999 * log_k, steps=10, global_step=50)
        assert "collapse" not in caplog.text  # 20 steps < patience
        monitor.update(0.999 * log_k, steps=10, global_step=60)
        monitor.update(0.999 * log_k, steps=10, global_step=70)
    assert caplog.text.count("Possible collapse") == 1 and "near log K" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        monitor.update(0.5 * log_k, steps=10, global_step=80)  # recovery re-arms the warning
        for step in range(9, 12):
            monitor.update(0.001, steps=10, global_step=10 * step)
    assert caplog.text.count("Possible collapse") == 1 and "near 0" in caplog.text


def test_push_outputs_uploads_backbone_at_the_root(tmp_path):
    from esvit.training.hub import create_hub_repo, push_outputs

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            calls.append(("upload", kwargs["folder_path"], kwargs.get("path_in_repo")))

    api = FakeApi()
    assert create_hub_repo("me/esvit-test", token=None, private=True, api=api) == "https://huggingface.co/me/esvit-test"
    url = push_outputs(tmp_path, "me/esvit-test", token=None, api=api)
    assert url == "https://huggingface.co/me/esvit-test"
    assert calls == [
        ("create", "me/esvit-test", {"private": True, "exist_ok": True}),
        ("upload", str(tmp_path / "model"), None),
        ("upload", str(tmp_path / "pretraining"), "pretraining"),
    ]


# ---------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_two_processes_equal_one_process(reference_run, small_parquet, hf_home, tmp_path):
    output_dir = tmp_path / "two_processes"
    args = tiny_run_args(small_parquet, output_dir, per_device_train_batch_size="2")
    summary = run_script(args, hf_home, processes=2)
    assert summary["num_processes"] == 2 and summary["global_batch_size"] == 4
    assert summary["images_seen"] == 6 * 4
    # Each global batch is split between the processes: disjoint halves of the reference's batch.
    reference = keys_by_step(reference_run, 0)
    rank0, rank1 = keys_by_step(output_dir, 0), keys_by_step(output_dir, 1)
    for step, keys in reference.items():
        assert not set(rank0[step]) & set(rank1[step])
        assert sorted(rank0[step] + rank1[step]) == sorted(keys)
    first_epoch = [k for step in range(5) for k in rank0[step] + rank1[step]]
    assert len(set(first_epoch)) == len(first_epoch) == NUM_IMAGES  # every image once per epoch
    assert_same_state(teacher_state(output_dir), teacher_state(reference_run), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_gradient_accumulation_equals_full_batch(reference_run, small_parquet, hf_home, tmp_path):
    output_dir = tmp_path / "accumulation"
    args = tiny_run_args(small_parquet, output_dir, per_device_train_batch_size="2", gradient_accumulation_steps="2")
    summary = run_script(args, hf_home)
    assert summary["global_batch_size"] == 4 and summary["global_step"] == 6
    assert_same_state(teacher_state(output_dir), teacher_state(reference_run), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("resume_step", [4, 5], ids=["mid-epoch", "end-of-epoch"])
def test_resume_reaches_the_uninterrupted_weights(reference_run, small_parquet, hf_home, tmp_path, resume_step):
    kept = sorted(p.name for p in (reference_run / "checkpoints").iterdir())
    assert kept == ["step_00000004", "step_00000005", "step_00000006"]  # the last 3 of 6 kept
    checkpoint = reference_run / "checkpoints" / f"step_{resume_step:08d}"
    output_dir = tmp_path / "resumed"
    if resume_step == 4:  # "latest" finds the checkpoint in the output folder
        shutil.copytree(checkpoint, output_dir / "checkpoints" / checkpoint.name)
        resume = "latest"
    else:  # an explicit folder; step 5 ends the first epoch, so the run starts a new one
        resume = str(checkpoint)
    summary = run_script(tiny_run_args(small_parquet, output_dir, resume_from_checkpoint=resume), hf_home)
    assert summary["global_step"] == 6 and summary["images_seen"] == 6 * 4
    assert_same_state(teacher_state(output_dir), teacher_state(reference_run), rtol=0, atol=0)
    # Only the remaining steps ran, on the reference's images of those steps.
    reference, resumed = keys_by_step(reference_run, 0), keys_by_step(output_dir, 0)
    assert sorted(resumed) == list(range(resume_step, 6)) and all(resumed[s] == reference[s] for s in resumed)


@pytest.mark.slow
def test_streamed_run_resumes_exactly(small_parquet, hf_home, tmp_path):
    """The stream path of the script (split by node, unprepared loader, epochs of a stream):
    a run resumed mid-epoch from a stream checkpoint ends with the uninterrupted run's weights."""
    table = datasets.load_dataset("parquet", data_files=str(small_parquet), split="train")
    table.save_to_disk(str(tmp_path / "saved"), num_shards=2)  # arrow: no parquet close pause
    files = sorted(str(p) for p in (tmp_path / "saved").glob("*.arrow"))

    def stream_args(output_dir: Path, **changes) -> list[str]:
        return tiny_run_args(files, output_dir, streaming="true", **changes)

    full = tmp_path / "full"
    summary = run_script(stream_args(full, checkpointing_steps="4"), hf_home)
    assert summary["global_step"] == 6 and summary["images_seen"] == 6 * 4
    epoch_keys = json.loads((full / "sample_keys" / "rank0.json").read_text())
    assert len({key for _, epoch, key in epoch_keys if epoch == 0}) == NUM_IMAGES  # 5 batches = the stream
    resumed = tmp_path / "resumed"
    run_script(stream_args(resumed, resume_from_checkpoint=str(full / "checkpoints" / "step_00000004")), hf_home)
    assert_same_state(teacher_state(resumed), teacher_state(full), rtol=0, atol=0)


@pytest.mark.slow
def test_augmenting_on_the_device_trains_and_resumes_exactly(reference_run, small_parquet, hf_home, tmp_path):
    """`--augment_on_device`: uint8 crops from the workers, the photometric half in the step, drawn
    from the data position, so a resumed run continues with the very same augmentations."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    summary = run_script(tiny_run_args(small_parquet, full, augment_on_device="true", checkpointing_steps="4"), hf_home)
    assert summary["global_step"] == 6 and math.isfinite(summary["final_metrics"]["loss"])
    assert keys_by_step(full, 0) == keys_by_step(reference_run, 0)  # the same images, augmented elsewhere
    reference = teacher_state(reference_run)
    assert any(not torch.equal(v, reference[k]) for k, v in teacher_state(full).items())
    checkpoint = full / "checkpoints" / "step_00000004"
    run_script(tiny_run_args(small_parquet, resumed, augment_on_device="true", resume_from_checkpoint=str(checkpoint)),
               hf_home)  # fmt: skip
    assert_same_state(teacher_state(resumed), teacher_state(full), rtol=0, atol=0)


@pytest.mark.slow
def test_init_from_a_saved_folder_switches_the_region_task_off(reference_run, small_parquet, hf_home, tmp_path):
    """`--init_from` loads weights and centres; lr 0 and momentum 1 keep the teacher as loaded."""
    output_dir = tmp_path / "init_from"
    args = tiny_run_args(
        small_parquet,
        output_dir,
        init_from=str(reference_run / "pretraining"),
        use_region_loss="false",
        learning_rate="0",
        momentum_teacher="1.0",
        max_train_steps="2",
        record_sample_keys=None,
    )
    summary = run_script(args, hf_home)
    assert "region_loss" not in summary["final_metrics"]
    loaded, reference = teacher_state(output_dir), teacher_state(reference_run)
    weights = {k: v for k, v in loaded.items() if not k.startswith("loss.")}
    assert_same_state(weights, {k: v for k, v in reference.items() if not k.startswith("loss.")}, rtol=0, atol=0)
    # View-only training leaves the region centre where it was loaded.
    torch.testing.assert_close(loaded["loss.region_center"], reference["loss.region_center"], rtol=0, atol=0)


@pytest.mark.slow
def test_embedded_default_run_loads_with_automodel(hf_home, tmp_path):
    """`python run_pretraining.py` (no data argument) trains on the shipped sample; 4 steps here."""
    output_dir = tmp_path / "default"
    summary = run_script(["--output_dir", str(output_dir), "--max_train_steps", "4", "--report_to", "none"], hf_home)
    assert summary["recipe"] == "tiny-cpu-default" and summary["global_step"] == 4
    assert summary["skipped_images"] == 0 and summary["images_seen"] == 4 * 25

    from transformers import AutoImageProcessor, AutoModel

    import esvit  # noqa: F401  (registers the model type)

    model = AutoModel.from_pretrained(output_dir / "model")
    processor = AutoImageProcessor.from_pretrained(output_dir / "model")
    image = datasets.load_dataset("parquet", data_files=str(EMBEDDED_DATASET), split="train")[0]["image"]
    pixels = processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
    size = model.config.image_size
    assert pixels.shape == (1, 3, size, size)
    with torch.no_grad():
        features = model(pixels).pooler_output
    assert features.shape == (1, model.config.hidden_size) and torch.isfinite(features).all()
    card = (output_dir / "model" / "README.md").read_text()
    assert "cvt-micro-p2" in card and "4 optimizer steps" in card and "Fashion-MNIST" in card
    assert (output_dir / "pretraining" / "esvit_loss.safetensors").is_file()
