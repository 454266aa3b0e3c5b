"""Models of ``splitxai benchmark`` (see :mod:`quantus_adapters.benchmark.zoo.models`)."""
