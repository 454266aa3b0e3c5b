"""Test configuration shared by every test module."""

import torch

# The tests use small tensors: one intra-op thread per process avoids the thread contention
# that makes them many times slower under `pytest -n 2` on a 2-core machine (and costs
# little in a single process).
torch.set_num_threads(1)
