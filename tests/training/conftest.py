"""Fixtures shared by the training tests."""

import pytest


@pytest.fixture
def one_thread():
    """One torch thread: on tiny tensors two threads waiting on each other cost more than they save."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
