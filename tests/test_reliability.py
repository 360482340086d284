"""Reliability guarantees of `run_pretraining.py`, each checked on real files and real processes.

One test per guarantee; each fails when the guarantee is removed:
* a crafted pickle planted in a checkpoint stops the resume, naming the file, and never runs;
* a non-finite loss skips its step (no non-finite checkpoint, counted, named in the log) and too
  many in a row stop the run;
* undecodable images (truncated, garbage, decompression bombs) are skipped, counted and named,
  and mostly broken data stops the run; a bomb costs no memory; EXIF orientation is applied;
* `--resume_from_checkpoint latest` serves the first start and every restart;
* a stalled peer ends the run with a timeout instead of a hang;
* a full disk fails the checkpoint cleanly, keeping the earlier one;
* SIGTERM checkpoints the current step and exits 0.

The runs use the tiny swin-micro setup of `tests/test_pretraining.py` on CPU, one thread each;
independent runs of one fixture are started together to keep the wall time down.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file

from tests import test_pretraining
from tests.test_pretraining import SCRIPT, _env, _import_script, launch_command, tiny_run_args

# The fixtures of tests/test_pretraining.py: a fresh HF_HOME and a 20-image parquet slice.
hf_home = test_pretraining.hf_home
small_parquet = test_pretraining.small_parquet

RUN_TIMEOUT = 300  # seconds; a run takes ~20 s here, most of it imports


# ------------------------------------------------------------------------------------ helpers
@dataclass
class Finished:
    """A finished subprocess run: exit status, combined stdout + stderr, peak memory, and what its
    output folder held when it ended (a later run in the same folder changes the folder)."""

    returncode: int
    log: str
    max_rss_kb: int
    output_dir: Path
    summary_file: dict | None  # train_summary.json
    checkpoints: list[str]  # names of the complete checkpoints
    finished_model: bool  # model/ was written

    def summary(self) -> dict:
        assert self.returncode == 0, f"run failed ({self.returncode}):\n{self.log[-6000:]}"
        assert self.summary_file is not None, "no train_summary.json"
        return self.summary_file


def launch(args: list[str], home: Path, log_path: Path, processes: int = 1) -> subprocess.Popen:
    """Start run_pretraining.py (under `accelerate launch` for several processes), output to a file."""
    command = launch_command(args, processes)
    env = {**_env(home), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        return subprocess.Popen(command, cwd=SCRIPT.parent, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, args: list[str], log_path: Path, timeout: float = RUN_TIMEOUT) -> Finished:
    """Wait for `proc` (reaping it with `os.wait4` for its own peak RSS) and collect its output."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"run did not end within {timeout} s:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.1)
    output_dir = Path(args[args.index("--output_dir") + 1])
    summary = output_dir / "train_summary.json"
    return Finished(
        proc.returncode,
        log_path.read_text(),
        usage.ru_maxrss,
        output_dir,
        json.loads(summary.read_text()) if summary.is_file() else None,
        [p.name for p in checkpoints(output_dir) if (p / "checkpoint_complete.json").is_file()],
        (output_dir / "model" / "config.json").is_file(),
    )


def run(args: list[str], home: Path, log_path: Path) -> Finished:
    return finish(launch(args, home, log_path), args, log_path)


def run_together(jobs: dict[str, list[str]], home: Path, log_dir: Path) -> dict[str, Finished]:
    """Run independent jobs at the same time (each is its own process, with its own peak RSS)."""
    started = {name: launch(args, home, log_dir / f"{name}.log") for name, args in jobs.items()}
    return {name: finish(proc, jobs[name], log_dir / f"{name}.log") for name, proc in started.items()}


def wait_for_line(proc: subprocess.Popen, log_path: Path, pattern: str, timeout: float = RUN_TIMEOUT) -> str:
    """Poll the log of a running process until a line matches `pattern`; return the match."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log_path.read_text())
        if found:
            return found.group(0)
        if proc.poll() is not None:
            raise AssertionError(f"run ended ({proc.returncode}) before {pattern!r}:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} within {timeout} s:\n{log_path.read_text()[-4000:]}")


def assert_all_finite(path: Path) -> None:
    tensors = load_file(str(path))
    assert tensors, path
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f"{path} holds non-finite tensors: {bad[:5]}"


def checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    return sorted(root.glob("step_*")) if root.is_dir() else []


def jpeg(image: Image.Image, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **save_args)
    return buffer.getvalue()


def noise_image(rng: np.random.RandomState, width: int, height: int) -> Image.Image:
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


def png_bomb(side: int = 13000) -> bytes:
    """A valid 1-bit greyscale PNG of side x side zero pixels: ~20 KB on disk, 169 Mpx, more than
    the 40-Mpx cap but under PIL's own error limit (179 Mpx), so only the cap stops PIL from
    decoding it (~0.5 GB as RGB). Written chunk by chunk, never held as pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (side + 7) // 8)  # filter byte 0, then the packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ------------------------------------------------------------------ SIGTERM, resume "latest"
TOTAL_STEPS = 20


@pytest.fixture(scope="module")
def interrupted_run(small_parquet, hf_home, tmp_path_factory) -> tuple[Finished, list[str], Path]:
    """A `--resume_from_checkpoint latest` run sent SIGTERM after its first logged step.

    Returns the finished run, its arguments, and a pristine copy of its checkpoint folder.
    """
    work = tmp_path_factory.mktemp("interrupted")
    args = tiny_run_args(
        small_parquet, work / "run", max_train_steps=str(TOTAL_STEPS), resume_from_checkpoint="latest",
        record_sample_keys=None,
    )  # fmt: skip
    log_path = work / "first.log"
    proc = launch(args, hf_home, log_path)
    try:
        wait_for_line(proc, log_path, rf"step 1/{TOTAL_STEPS} ")
        proc.send_signal(signal.SIGTERM)
        finished = finish(proc, args, log_path)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    found = checkpoints(finished.output_dir)
    pristine = work / "pristine" / (found[-1].name if found else "none")
    if found:
        shutil.copytree(found[-1], pristine)
    return finished, args, pristine


@pytest.fixture(scope="module")
def resumed_run(interrupted_run, hf_home, tmp_path_factory) -> Finished:
    """The identical command again, after the interruption."""
    _, args, _ = interrupted_run
    return run(args, hf_home, tmp_path_factory.mktemp("resumed") / "second.log")


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_exits_0(interrupted_run, resumed_run):
    first, _, pristine = interrupted_run
    summary = first.summary()  # exit code 0
    assert summary["interrupted"] is True
    step = summary["global_step"]
    assert 1 <= step < TOTAL_STEPS
    assert "SIGTERM: stopping after this step" in first.log
    last_logged = [int(s) for s in re.findall(rf"step (\d+)/{TOTAL_STEPS} ", first.log)][-1]
    assert last_logged == step  # the step running when the signal came was finished, then saved
    assert first.checkpoints == [f"step_{step:08d}"]
    checkpoint = pristine  # the copy made as the run ended
    assert json.loads((checkpoint / "checkpoint_complete.json").read_text())["global_step"] == step
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    assert not first.finished_model  # an interrupted run is not a finished model
    # the same command then finishes the run from there
    resumed = resumed_run.summary()
    assert resumed["interrupted"] is False and resumed["global_step"] == TOTAL_STEPS
    assert f"at step {step} " in resumed_run.log
    assert resumed_run.finished_model
    assert_all_finite(resumed_run.output_dir / "model" / "model.safetensors")


@pytest.mark.slow
def test_resume_latest_starts_fresh_then_resumes(interrupted_run, resumed_run):
    first, _, _ = interrupted_run
    assert "--resume_from_checkpoint latest: no checkpoint under" in first.log
    assert "starting a new run" in first.log and "Resumed from" not in first.log
    assert resumed_run.returncode == 0, resumed_run.log[-4000:]
    assert "Resumed from" in resumed_run.log and "starting a new run" not in resumed_run.log


# ------------------------------------------------------------------ planted pickles
class _Payload:
    """Unpickling this runs `open(marker, "w").write(...)`: the attack a planted file would make."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pickle code ran')",))


def write_payload(path: Path, marker: Path) -> None:
    torch.save({"state": _Payload(marker), "step": torch.tensor(1)}, path)


PLANTED = ["optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"]


@pytest.fixture(scope="module")
def planted_resumes(interrupted_run, hf_home, tmp_path_factory) -> dict[str, tuple[Finished, Path, Path]]:
    """For each file of PLANTED: a copy of the interrupted run's checkpoint holding the payload under
    that name, resumed with `--resume_from_checkpoint latest` (all cases at the same time)."""
    _, args, pristine = interrupted_run
    assert pristine.is_dir(), "the interrupted run left no checkpoint"
    work = tmp_path_factory.mktemp("planted")
    # The payload is live: an unrestricted torch.load runs it.
    probe = work / "probe_marker"
    write_payload(work / "probe.bin", probe)
    torch.load(work / "probe.bin", weights_only=False)
    assert probe.read_text() == "pickle code ran"

    jobs, cases = {}, {}
    for name in PLANTED:
        case = work / name.replace(".", "_")
        checkpoint = case / "run" / "checkpoints" / pristine.name
        shutil.copytree(pristine, checkpoint)
        marker = case / "marker"
        write_payload(checkpoint / name, marker)
        output = args.index("--output_dir") + 1
        jobs[name] = [*args[:output], str(case / "run"), *args[output + 1 :]]
        cases[name] = (checkpoint / name, marker)
    results = run_together(jobs, hf_home, work)
    return {name: (results[name], *cases[name]) for name in PLANTED}


@pytest.mark.slow
@pytest.mark.parametrize("planted", PLANTED)
def test_planted_pickle_stops_the_resume_and_never_runs(planted_resumes, planted):
    finished, path, marker = planted_resumes[planted]
    assert finished.returncode != 0, f"resumed from a checkpoint holding a crafted {planted}:\n{finished.log[-3000:]}"
    assert "UnsafeCheckpointError" in finished.log and f"{path} " in finished.log
    assert "refusing to resume" in finished.log
    assert not marker.exists(), "the planted pickle ran"
    assert finished.summary_file is None


# ------------------------------------------------------------------ non-finite losses, in process
@pytest.fixture
def in_process(monkeypatch):
    """`run_pretraining` imported here, with the process-wide state it touches restored afterwards."""
    from accelerate.state import AcceleratorState, GradientState

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    handlers_by_signal = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess runs (OMP_NUM_THREADS=1): the machine is shared
    yield _import_script()
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    for sig, handler in handlers_by_signal.items():
        signal.signal(sig, handler)
    root.handlers, root.level = handlers, level


def inject_inf(monkeypatch, bad_calls) -> list[int]:
    """Make `EsViTLoss` return an infinite loss (and so infinite gradients) on the chosen calls."""
    from esvit.training.loss import EsViTLoss

    original, calls = EsViTLoss.forward, []

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append(len(calls))
        return replace(out, loss=out.loss * float("inf")) if bad_calls(calls[-1]) else out

    monkeypatch.setattr(EsViTLoss, "forward", forward)
    return calls


def test_nonfinite_steps_are_skipped_and_never_checkpointed(in_process, monkeypatch, small_parquet, tmp_path, capsys):
    bad = {3, 5}  # one loss call per optimizer step: the 0-based steps 3 and 5, around the step-4 checkpoint
    calls = inject_inf(monkeypatch, bad.__contains__)
    output_dir = tmp_path / "run"
    args = tiny_run_args(
        small_parquet, output_dir, max_train_steps="8", checkpointing_steps="2", checkpoints_total_limit="2",
        logging_steps="10", dataset_cache_dir=str(tmp_path / "cache"), record_sample_keys=None,
    )  # fmt: skip
    summary = in_process.main(args)
    log = capsys.readouterr().out
    assert len(calls) == 8
    assert summary["nonfinite_steps"] == len(bad) and summary["global_step"] == 8
    for step in bad:  # logged counted from 1, as step_N checkpoints are
        assert f"Step {step + 1} has a non-finite loss or gradient: skipped" in log
    assert log.count("has a non-finite loss or gradient") == len(bad)
    kept = checkpoints(output_dir)
    assert [p.name for p in kept] == ["step_00000006", "step_00000008"]  # rotation kept the newest
    for checkpoint in kept:
        assert (checkpoint / "checkpoint_complete.json").is_file()
        assert_all_finite(checkpoint / "teacher.safetensors")
        assert_all_finite(checkpoint / "model.safetensors")
        assert json.loads((checkpoint / "trainer_state.json").read_text())["nonfinite_steps"] == len(bad)
    assert_all_finite(output_dir / "model" / "model.safetensors")
    assert_all_finite(output_dir / "pretraining" / "model.safetensors")
    assert_all_finite(output_dir / "pretraining" / "esvit_loss.safetensors")


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(in_process, monkeypatch, small_parquet, tmp_path, capsys):
    from esvit.training.pretrainer import NonFiniteLossError

    inject_inf(monkeypatch, lambda call: call >= 2)  # every step from the 0-based step 2 on
    output_dir = tmp_path / "run"
    args = tiny_run_args(
        small_parquet, output_dir, max_train_steps="8", checkpointing_steps="2", max_consecutive_nonfinite="3",
        dataset_cache_dir=str(tmp_path / "cache"), record_sample_keys=None,
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"3 optimizer steps in a row .* the first at step 3"):
        in_process.main(args)
    log = capsys.readouterr().out
    assert "Step 5 has a non-finite loss or gradient" in log and "Step 6 " not in log
    kept = checkpoints(output_dir)
    assert [p.name for p in kept] == ["step_00000002", "step_00000004"]
    for checkpoint in kept:
        assert_all_finite(checkpoint / "teacher.safetensors")
        assert_all_finite(checkpoint / "model.safetensors")
    assert not (output_dir / "model").exists()


# ------------------------------------------------------------------ undecodable images
NUM_GOOD = 60
NUM_BOMBS = 4


def good_images(folder: Path, count: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i in range(count):
        (folder / f"good_{i:03d}.jpg").write_bytes(jpeg(noise_image(rng, 48, 40)))


@pytest.fixture(scope="module")
def folder_runs(hf_home, tmp_path_factory) -> dict[str, Finished]:
    """Batch-1 runs over image folders, at the same time: `bad` (NUM_GOOD good images, a truncated
    JPEG, random bytes named .jpg, NUM_BOMBS PNG bombs), `clean` (the good images alone) and
    `broken` (10 good images, 45 garbage files)."""
    work = tmp_path_factory.mktemp("folders")
    rng = np.random.RandomState(1)
    for name in ("bad", "clean"):
        good_images(work / name, NUM_GOOD)
    whole = jpeg(noise_image(rng, 64, 64))
    (work / "bad" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (work / "bad" / "garbage.jpg").write_bytes(rng.bytes(3000))
    bomb = png_bomb()
    for i in range(NUM_BOMBS):
        (work / "bad" / f"bomb_{i}.png").write_bytes(bomb)
    good_images(work / "broken", 10, seed=2)
    for i in range(45):
        (work / "broken" / f"garbage_{i:02d}.jpg").write_bytes(rng.bytes(500))

    def folder_args(name: str, **changes) -> list[str]:
        return tiny_run_args(
            [], work / f"{name}_run", train_files=None, train_dir=str(work / name), per_device_train_batch_size="1",
            max_bad_fraction="0.2", logging_steps="20", record_sample_keys=None, **changes,
        )  # fmt: skip

    # 61 steps: the whole first epoch (every bad image read once) and one image of the next
    jobs = {
        "bad": folder_args("bad", max_train_steps=str(NUM_GOOD + 1)),
        "clean": folder_args("clean", max_train_steps=str(NUM_GOOD + 1)),
        "broken": folder_args("broken", max_train_steps="50"),
    }
    return run_together(jobs, hf_home, work)


@pytest.mark.slow
def test_bad_images_are_skipped_counted_and_named(folder_runs):
    finished = folder_runs["bad"]
    summary = finished.summary()
    assert summary["global_step"] == NUM_GOOD + 1
    skipped_lines = re.findall(r"Skipping image (\S+) \(row \d+\): it cannot be decoded \((.*)\)\.", finished.log)
    names = {Path(path).name for path, _ in skipped_lines}
    assert names == {"truncated.jpg", "garbage.jpg", *(f"bomb_{i}.png" for i in range(NUM_BOMBS))}
    assert all("exceeds the cap of 40.0 Mpx" in why for path, why in skipped_lines if "bomb_" in path)
    assert summary["images_seen"] == NUM_GOOD + 1


@pytest.mark.slow
def test_summary_counts_every_skipped_image(folder_runs):
    finished = folder_runs["bad"]
    logged = finished.log.count("Skipping image ")
    assert logged >= 2 + NUM_BOMBS  # each bad image read at least once
    assert finished.summary()["skipped_images"] == logged


@pytest.mark.slow
def test_mostly_broken_data_stops_the_run(folder_runs):
    finished = folder_runs["broken"]
    assert finished.returncode != 0
    assert "could not be decoded (more than --max_bad_fraction 0.2)" in finished.log
    assert "The data looks broken" in finished.log
    assert finished.summary_file is None


@pytest.mark.slow
def test_decompression_bombs_cost_no_memory(folder_runs):
    bad, clean = folder_runs["bad"], folder_runs["clean"]
    assert bad.returncode == 0 and clean.returncode == 0, bad.log[-3000:] + clean.log[-3000:]
    # one bomb decoded would add ~0.7 GB (1 byte per pixel, then RGB) to a ~1 GB run
    assert bad.max_rss_kb <= 1.10 * clean.max_rss_kb, (bad.max_rss_kb, clean.max_rss_kb)
    assert bad.log.count("exceeds the cap of 40.0 Mpx") == NUM_BOMBS


def test_exif_rotated_jpeg_is_trained_upright():
    """The training collator decodes with `esvit.images.decode_image`, which applies the EXIF
    orientation: a 60x40 photo tagged "rotate 90°" (orientation 6) arrives as 40x60."""
    from esvit.training.data import DataArguments, MultiCropCollator, min_side_for_crops

    rng = np.random.RandomState(0)
    image = noise_image(rng, 60, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    raw = jpeg(image, exif=exif)
    stored = Image.open(io.BytesIO(raw))
    assert stored.size == (60, 40) and stored.getexif()[0x0112] == 6
    upright = ImageOps.exif_transpose(stored).convert("RGB")
    assert upright.size == (40, 60)

    seen = []

    def augment(decoded, seed):
        seen.append(decoded)
        return [torch.zeros(3, 8, 8)]

    args = DataArguments(global_crop_size=64, local_crop_size=32, num_local_crops=2)
    collator = MultiCropCollator(augment, seed=0, min_side=min_side_for_crops(args))
    batch = collator([{"image": {"bytes": raw, "path": "photo.jpg"}, "row": 0}])
    assert batch["num_skipped"] == 0
    (decoded,) = seen
    assert decoded.mode == "RGB" and decoded.size == upright.size
    assert np.array_equal(np.asarray(decoded), np.asarray(upright))


# ------------------------------------------------------------------ a stalled peer
@pytest.mark.slow
def test_a_stalled_peer_ends_the_run_with_a_timeout(small_parquet, hf_home, tmp_path):
    """Rank 1 of a real 2-process gloo run is frozen (SIGSTOP) mid-run: rank 0 must give up in its
    next collective after --ddp_timeout seconds with a timeout error, not wait forever. (The
    launcher then takes another 30 s to kill the frozen rank; the test does not wait for that.)"""
    import psutil

    args = tiny_run_args(
        small_parquet, tmp_path / "run", per_device_train_batch_size="2", max_train_steps="500",
        ddp_timeout="20", record_sample_keys=None,
    )  # fmt: skip
    log_path = tmp_path / "two.log"
    proc = launch(args, hf_home, log_path, processes=2)
    launcher = psutil.Process(proc.pid)
    ranks: dict[int, psutil.Process] = {}
    try:
        wait_for_line(proc, log_path, r"step 1/500 ")
        workers = [p for p in launcher.children(recursive=True) if str(SCRIPT) in " ".join(p.cmdline())]
        ranks = {int(p.environ().get("RANK", -1)): p for p in workers}
        assert set(ranks) == {0, 1}, ranks
        ranks[1].suspend()  # SIGSTOP: alive, holding its sockets, answering nothing
        stalled = time.monotonic()
        try:
            ranks[0].wait(timeout=150)
        except psutil.TimeoutExpired:
            pytest.fail(f"rank 0 still hangs 150 s after its peer stalled:\n{log_path.read_text()[-3000:]}")
        waited = time.monotonic() - stalled
        assert waited < 120, waited
        time.sleep(1)  # the launcher relays rank 0's last output
        log = log_path.read_text()
        assert re.search(r"\[rank0\]: .*timed? ?out", log, re.IGNORECASE), log[-4000:]
    finally:
        for process in [*ranks.values(), launcher]:
            try:
                process.resume()
                process.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait()


# ------------------------------------------------------------------ a full disk
def student_bytes(args: list[str]) -> int:
    """Bytes of the student's state (model.safetensors) of the run `args` describes."""
    from esvit import EsViTForPreTraining
    from esvit.training.arguments import parse_arguments

    model_args, _, _ = parse_arguments(args)
    model = EsViTForPreTraining(model_args.build_config())
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# Where the second checkpoint's write runs out of space: the first file accelerate writes (by
# safetensors) or the optimizer state (by torch.save), each after a first checkpoint that fits.
DISK_FULL_AT = [
    "model.safetensors",
    "optimizer.bin",
]


@pytest.fixture(scope="module")
def full_disk_runs(small_parquet, hf_home, tmp_path_factory):
    """For each point of DISK_FULL_AT, a 4-step run (checkpoints at steps 2 and 4) whose output folder
    is on a tmpfs just too small for the second checkpoint; the runs go at the same time."""
    work = tmp_path_factory.mktemp("full_disk")
    jobs = {
        name: tiny_run_args(
            small_parquet,
            work / name / "run",
            max_train_steps="4",
            checkpointing_steps="2",
            record_sample_keys=None,
        )  # fmt: skip
        for name in ("model.safetensors", "optimizer.bin")
    }
    size = student_bytes(jobs["optimizer.bin"])
    # a checkpoint is student + teacher + AdamW's two moments (~4x the student) and a few small files
    checkpoint = 4 * size + 256 * 1024
    room = {"model.safetensors": checkpoint + size // 2, "optimizer.bin": checkpoint + 2 * size}
    mounted = []
    try:
        for name in jobs:
            disk = work / name
            disk.mkdir()
            mount = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={room[name] // 1024}k", "tmpfs", str(disk)],
                capture_output=True, text=True,
            )  # fmt: skip
            if mount.returncode != 0:
                pytest.skip(f"cannot mount a small tmpfs here: {mount.stderr.strip() or mount.returncode}")
            mounted.append(disk)
        yield run_together(jobs, hf_home, work)
    finally:
        for disk in mounted:
            subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("full_at", DISK_FULL_AT)
def test_full_disk_fails_the_checkpoint_cleanly(full_disk_runs, full_at):
    from esvit.training.checkpointing import verify_checkpoint_folder

    finished = full_disk_runs[full_at]
    assert finished.returncode != 0, finished.log[-3000:]
    assert "CheckpointWriteError" in finished.log, finished.log[-3000:]
    message = re.search(r"could not write the checkpoint .*", finished.log).group(0)
    assert "step_00000004" in message and "no space left on the device" in message
    assert re.search(r"needs about \d+\.\d MiB; \d+\.\d MiB free", message), message
    root = finished.output_dir / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step_00000002"]  # no partial folder
    earlier = root / "step_00000002"
    assert (earlier / "checkpoint_complete.json").is_file()
    verify_checkpoint_folder(earlier)  # every file there, each loads as plain data
    for name in ("model.safetensors", "teacher.safetensors", "loss.safetensors"):
        assert_all_finite(earlier / name)
    assert json.loads((earlier / "trainer_state.json").read_text())["global_step"] == 2
