"""Suite-wide setup: one intra-op thread, and the tiny corpus as fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from support import TEST_THREADS, write_corpus

torch.set_num_threads(TEST_THREADS)


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """A directory with train.txt (300 lines), valid.txt and test.txt (40 lines each)."""
    return write_corpus(tmp_path / "corpus")


@pytest.fixture(scope="module")
def module_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny corpus, shared by the tests of one module."""
    return write_corpus(tmp_path_factory.mktemp("corpus"))
