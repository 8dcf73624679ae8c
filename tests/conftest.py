"""Fixtures shared by the whole test tree."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pytest
import torch


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op torch thread for the test (threads spin against other processes on a shared
    2-core machine); the previous count is restored afterwards. Use it module-wide with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with _torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """:func:`one_thread` for a whole module at once."""
    with _torch_threads(1):
        yield


@pytest.fixture
def two_threads() -> Iterator[None]:
    """Two intra-op torch threads for the test: results from fixed seeds then do not depend on the
    machine's core count (float summation order follows the thread count)."""
    with _torch_threads(2):
        yield
