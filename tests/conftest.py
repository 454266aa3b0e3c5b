"""Test configuration shared by every test module."""

import os

import torch

# Under `pytest -n 2` on a 2-core machine each worker must stay on one thread: two torch
# threads per worker oversubscribe the cores and make convolutions many times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
