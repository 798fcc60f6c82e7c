"""Shared pytest fixtures."""

import pytest


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch thread: tiny convolutions are far faster so on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
