"""Suite-wide setup: one intra-op thread, a per-user cache of the suite's own, and the tiny
corpus as fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from support import TEST_THREADS, write_corpus

torch.set_num_threads(TEST_THREADS)


@pytest.fixture(autouse=True, scope="session")
def _own_user_cache(tmp_path_factory: pytest.TempPathFactory):
    """The per-user cache (``$XDG_CACHE_HOME``: encoded corpora, PTB) is a temporary folder of
    the suite's own, passed on to the processes tests start: a test run never reads the user's
    cache, nor fills it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("user-cache")))
        yield


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """A directory with train.txt (300 lines), valid.txt and test.txt (40 lines each)."""
    return write_corpus(tmp_path / "corpus")


@pytest.fixture(scope="module")
def module_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny corpus, shared by the tests of one module."""
    return write_corpus(tmp_path_factory.mktemp("corpus"))
