"""Shared fixtures. Triton's interpreter must be switched on before any kernel is defined."""
import os

try:  # no GPU: run Triton kernels in the interpreter (fp32 only, see codegen tests)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260K"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is absent (real models and data live there)")
    return SHARED


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not STORIES.is_dir():
        pytest.skip("../shared/models/stories260K is absent")
    return STORIES
