"""Shared pytest fixtures.

The reference outputs of the original EsViT code live in ``../shared/fixtures/esvit_reference``
(next to the checkout). A user's clone may not have them: tests that need them are skipped with the
reason. Under CI (``CI=true``) their absence is a failure, so parity can never be skipped silently.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(
    os.environ.get("ESVIT_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "fixtures" / "esvit_reference")
)


def _is_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Folder of the original code's reference outputs; skip (or fail under CI) when absent."""
    if not (REFERENCE_DIR / "manifest.json").is_file():
        message = (
            f"reference fixtures not found at {REFERENCE_DIR} (set ESVIT_REFERENCE_DIR or place "
            "../shared beside the checkout)"
        )
        if _is_ci():
            pytest.fail("CI=true but " + message)
        pytest.skip(message)
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def reference_manifest(reference_dir: Path) -> dict:
    return json.loads((reference_dir / "manifest.json").read_text())


@pytest.fixture(scope="session")
def reference_inputs(reference_dir: Path) -> dict:
    """The shared input batch as float32: global_view1/2 [2,3,224,224], local_view1/2 [2,3,96,96]."""
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(reference_dir / "inputs.safetensors").items()}


def load_reference_state_dict(reference_dir: Path, manifest: dict, name: str) -> dict:
    """The original model's full state_dict (backbone + heads), integer index buffers restored."""
    from safetensors.torch import load_file

    state = load_file(reference_dir / f"{name}.weights.safetensors")
    index_file = reference_dir / f"{name}.index_buffers.safetensors"
    if index_file.is_file():
        buffers = load_file(index_file)
        for key, entry in manifest["models"][name].get("index_buffer_map", {}).items():
            state[key] = buffers[entry].long()
    return state
