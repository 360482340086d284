"""A newcomer's path: one-line errors with suggestions, nothing lost or overwritten by mistake,
a run that says what it learned, and a model card built from the run's effective values."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import datasets
import pytest
import torch

from esvit.training.arguments import PretrainingArguments, parse_arguments
from esvit.training.data import EMBEDDED_DATASET
from esvit.training.schedules import plan_training
from tests.reference import REPO_ROOT
from tests.test_pretraining import _import_script, tiny_run_args


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config_overrides", "imagesize=64"], "did you mean 'image_size'"),
        (["--config_overrides", '{"image_size": 64'], "not valid JSON"),
        (["--config_overrides", "depths=2"], "depths"),
        (["--model_preset", "swin-tiy"], "did you mean 'swin-tiny-w7'"),
        (["--recipe", "small-image-cpu"], "did you mean 'small-images-cpu'"),
        (["--checkpointing_steps", "often"], "'epoch'"),
        (["--train_dir", "/nonexistent/folder", "--recipe", "small-images-cpu"], "is not a folder"),
        (["--eval_dir", "/nonexistent/labelled"], "is not a folder"),
        (["--train_files", "/nonexistent/train.parquet"], "does not exist"),
    ],
)
def test_user_errors_are_one_line(argv, message):
    script = _import_script()
    with pytest.raises(SystemExit) as err:
        script.main(argv)
    text = str(err.value)
    assert text.startswith("run_pretraining.py: error:") and message in text and "\n" not in text


def test_a_folder_without_images_is_refused_before_training(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(SystemExit, match="holds no image"):
        _import_script().main(["--train_dir", str(tmp_path)])


# The early answers must not pay for torch: the script checks its arguments before its heavy imports
# and `import esvit` defers the Auto-class registration while it does.
_IMPORTS_AT_EXIT = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("HEAVY:", sorted(m for m in ("torch", "datasets", "accelerate") if m in sys.modules), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "script, argv, expected",
    [
        ("run_pretraining.py", ["--help"], "--num_local_crops"),
        ("run_pretraining.py", ["--num_locl_crops", "1"], "did you mean '--num_local_crops'"),
        ("run_pretraining.py", ["--recipe", "small-image-cpu"], "did you mean 'small-images-cpu'"),
        ("run_pretraining.py", ["--train_dir", "/nonexistent/folder"], "is not a folder"),
        ("run_linear_probe.py", ["--help"], "--train_val_split"),
        ("run_linear_probe.py", ["--model_name_or_path", "m", "--output_dir", "o", "--protocol", "knnn"], "knnn"),
    ],
)
def test_help_and_argument_errors_answer_before_torch_is_imported(script, argv, expected):
    run = subprocess.run(
        [sys.executable, "-c", _IMPORTS_AT_EXIT, script, *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert expected in run.stdout + run.stderr
    assert "HEAVY: []" in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr


def test_the_package_registers_the_auto_classes_on_import_in_a_fresh_process():
    code = (
        "import esvit, transformers\n"
        "config = transformers.AutoConfig.for_model('esvit')\n"
        "print(type(config).__name__, transformers.AutoModel._model_mapping[type(config)].__name__,"
        " transformers.AutoBackbone._model_mapping[type(config)].__name__)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert run.stdout.split() == ["EsViTConfig", "EsViTModel", "EsViTBackbone"]


def test_unknown_flag_names_the_nearest():
    with pytest.raises(SystemExit, match="did you mean '--num_local_crops'"):
        parse_arguments(["--recipe", "tiny-cpu-default", "--num_locl_crops", "1"])


def test_checkpointing_every_epoch():
    args = PretrainingArguments(checkpointing_steps="epoch")
    assert args.checkpoint_interval(steps_per_epoch=17) == 17
    assert PretrainingArguments(checkpointing_steps="5").checkpoint_interval(None) == 5
    with pytest.raises(ValueError, match="known length"):
        args.checkpoint_interval(None)


def test_a_stream_of_unknown_length_names_every_epoch_argument_at_once():
    args = SimpleNamespace(
        warmup_epochs=10, warmup_steps=None, warmup_teacher_temp_epochs=30, warmup_teacher_temp_steps=None,
        freeze_last_layer_epochs=1, freeze_last_layer_steps=None, max_train_steps=None, num_train_epochs=100,
    )  # fmt: skip
    with pytest.raises(ValueError) as err:
        plan_training(args, steps_per_epoch=None, global_batch_size=256)
    for name in ("--max_train_steps", "--warmup_steps", "--warmup_teacher_temp_steps", "--freeze_last_layer_steps"):
        assert name in str(err.value)


def test_streaming_a_saved_dataset_uses_its_length(tmp_path):
    from accelerate import Accelerator

    from esvit.training.arguments import DataArguments
    from esvit.training.data import MultiCropCollator, build_augmentation, build_pretraining_loader
    from esvit.training.data import load_pretraining_images as load

    saved = tmp_path / "saved"
    datasets.load_dataset("parquet", data_files=str(EMBEDDED_DATASET), split="train").save_to_disk(str(saved))
    args = DataArguments(dataset_from_disk=str(saved), streaming=True, global_crop_size=32, num_local_crops=0)
    dataset = load(args)
    accelerator = Accelerator(cpu=True)
    loader = build_pretraining_loader(
        dataset, accelerator=accelerator, collator=MultiCropCollator(build_augmentation(args), seed=0),
        batch_size=25, num_workers=0, seed=0,
    )  # fmt: skip
    assert loader.batches_per_epoch is None  # a stream ...
    assert loader.known_batches_per_epoch(args, 25, accelerator) == 20  # ... whose source has a length


def test_converter_explains_a_plain_state_dict(tmp_path, capsys):
    from esvit.conversion.original import main

    path = tmp_path / "plain.pth"
    torch.save({"layers.0.weight": torch.zeros(2)}, path)
    with pytest.raises(SystemExit):
        main([str(path), str(tmp_path / "out"), "--preset", "swin-tiny-w7"])
    err = capsys.readouterr().err
    assert "not a checkpoint of the original training script" in err and "'teacher'" in err


@pytest.mark.slow
def test_a_run_reports_what_it_learned_and_refuses_to_overwrite(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    script = _import_script()
    output = tmp_path / "run"
    args = tiny_run_args(
        EMBEDDED_DATASET, output, max_train_steps="4", record_sample_keys="false",
        eval_dataset_name=str(EMBEDDED_DATASET), eval_max_samples="200",
    )  # fmt: skip
    summary = script.main(args)
    printed = capsys.readouterr().out
    assert "random weights" in printed and "Saved the teacher" in printed
    assert {"knn_top1_initial", "knn_top1_final", "knn_top1_best"} <= set(summary)
    assert json.loads((output / "train_summary.json").read_text())["global_step"] == 4

    card = (output / "model" / "README.md").read_text()
    assert "license: mit" in card and "@inproceedings{li2022esvit" in card and "trust_remote_code" in card
    assert str(tmp_path) not in card  # no local paths published
    peak = 0.02 * 4 / 256  # linear scaling to the global batch of 4
    assert f"peak learning rate {peak:.3g}" in card and "k-NN monitor" in card

    with pytest.raises(FileExistsError, match="finished model"):  # a finished run is never overwritten silently
        script.main(args)
    assert (output / "model" / "config.json").is_file()


def test_a_launch_that_started_fewer_processes_says_so(monkeypatch, caplog):
    import psutil

    from esvit.training.logs import warn_if_fewer_processes_than_launched

    class Parent:
        def cmdline(self):
            return ["python", "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "run_pretraining.py"]

    monkeypatch.setattr(psutil.Process, "parent", lambda self: Parent())
    with caplog.at_level("WARNING"):
        warn_if_fewer_processes_than_launched(SimpleNamespace(num_processes=1))
    assert "asked for 2 processes but started 1" in caplog.text and "--multi_gpu" in caplog.text


def test_log_lines_go_above_the_progress_bar(monkeypatch):
    import logging

    from esvit.training import logs

    written = []
    monkeypatch.setattr(logs.tqdm, "write", lambda text, *a, **k: written.append(text))
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure_logging(is_local_main_process=True)
        logging.getLogger("esvit.test").info("a line")
        logging.getLogger("accelerate.checkpointing").info("Model weights saved in ...")  # quieted
    finally:
        root.handlers, root.level = saved
    assert len(written) == 1 and written[0].endswith("esvit.test: a line")


def test_push_to_hub_checks_the_repository_before_training(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError("401: invalid token")

    script = _import_script()
    monkeypatch.setattr(script, "create_hub_repo", refuse)
    output = tmp_path / "run"
    args = tiny_run_args(EMBEDDED_DATASET, output, max_train_steps="2", record_sample_keys="false")
    with pytest.raises(PermissionError, match="invalid token"):
        script.main([*args, "--push_to_hub", "true", "--hub_model_id", "me/esvit-test"])
    assert not (output / "model").exists() and not (output / "train_summary.json").exists()  # nothing trained


@pytest.mark.slow
def test_resuming_with_another_number_of_processes_warns(tmp_path, caplog):
    script = _import_script()
    output = tmp_path / "run"
    args = tiny_run_args(
        EMBEDDED_DATASET, output, max_train_steps="2", checkpointing_steps="1", record_sample_keys="false"
    )
    script.main(args)
    state_file = sorted((output / "checkpoints").glob("step_*"))[0] / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["num_processes"] = 2  # as if written by a 2-process run
    state_file.write_text(json.dumps(state))
    with caplog.at_level("WARNING"):
        script.main([*args, "--resume_from_checkpoint", str(state_file.parent)])
    assert "written by 2 processes and is resumed by 1" in caplog.text and "--num_processes" in caplog.text
