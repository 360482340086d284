"""The prepared GPU benchmark scripts run end to end (on CPU, at a tiny size, on generated data),
so that a lent GPU session spends its minutes measuring, not debugging."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np

from tests.reference import REPO_ROOT


def _write_idx(path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes (Fashion-MNIST's format), gzipped."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_gpu_script_trains_and_scores_on_cpu(tmp_path):
    rng = np.random.default_rng(0)
    for stem, n in (("train", 96), ("t10k", 40)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28)) + 19 * labels[:, None, None]  # a class-dependent brightness
        _write_idx(tmp_path / f"{stem}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{stem}-labels-idx1-ubyte.gz", labels)
    result_file = tmp_path / "result.json"
    # run as on the GPU machine, where `datasets` is not installed: the script must never import it
    wrapper = (
        "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
        "print('datasets imported:', 'datasets' in sys.modules)"
    )
    command = [
        sys.executable, "-c", wrapper, "benchmarks/fashion_mnist_gpu.py", "--device", "cpu", "--data_dir", str(tmp_path),
        "--minutes", "0.01", "--batch_size", "16", "--calibration_steps", "2", "--probe_epochs", "2",
        "--eval_batch_size", "64", "--json", str(result_file), "--train_args", "--num_local_crops 1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert result["steps"] >= 1 and result["images_seen"] == 16 * result["steps"]
    assert result["num_train"] == 96 and result["num_test"] == 40
    for row in ("random", "pretrained"):
        assert 0.0 <= result[row]["knn_top1"] <= 100.0 and 0.0 <= result[row]["linear_top1"] <= 100.0
    assert "| random weights |" in run.stdout and "| EsViT (fashion-mnist-cpu" in run.stdout
    assert "datasets imported: False" in run.stdout
