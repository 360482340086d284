"""Shared pytest fixtures.

The reference outputs of the original EsViT code live in ``../shared/fixtures/esvit_reference``
(next to the checkout, or ``ESVIT_REFERENCE_DIR``); `tests/reference.py` finds and reads them. A
user's clone may not have them: tests that need them are skipped with the reason. Under CI
(``CI=true``) their absence is a failure, so parity can never be skipped silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.reference import REFERENCE_DIR, load_manifest, load_reference_inputs, reference_missing


def _is_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Folder of the original code's reference outputs; skip (or fail under CI) when absent."""
    message = reference_missing(REFERENCE_DIR)
    if message is not None:
        if _is_ci():
            pytest.fail("CI=true but " + message)
        pytest.skip(message)
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def reference_manifest(reference_dir: Path) -> dict:
    return load_manifest(reference_dir)


@pytest.fixture(scope="session")
def reference_inputs(reference_dir: Path) -> dict:
    """The shared input batch as float32: global_view1/2 [2,3,224,224], local_view1/2 [2,3,96,96]."""
    return load_reference_inputs(reference_dir)
