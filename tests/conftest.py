"""Shared test setup: deterministic, CPU, small thread count."""
import os

import pytest
import torch

# 2 threads on CI's 2 cores; PAGODA_TEST_THREADS=1 when the machine is shared (oversubscription is ~100x slower).
torch.set_num_threads(int(os.environ.get("PAGODA_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
