"""``splitxai benchmark``: the paper's evaluation (section 5) on any model and data.

Modules
-------
cli
    The command line (``main(argv) -> int``).
data
    The built-in cluttered digits, the bundled CIFAR-10 samples, ``folder:PATH`` and
    ``imagenet-s:PATH``.
images
    Image and mask files of every PIL mode to [0, 1] with the model's channel count.
zoo.models
    The built-in digits CNN (trained on the fly, cached), the bundled ResNet-20, torchvision's
    ImageNet models and ``FILE.py:FACTORY``.
zoo.spec
    ``--model``/``--weights`` as a picklable spec (the same model in Ray workers).
protocol
    Methods as registry names plus options, layers, the Quantus metrics, layer selection.
cells
    The unit of work: one method configuration on one set of images (picklable job in,
    records out) and the fingerprints that key its cells.
runner
    Validation, selection, test, alpha ablation, randomisation check, timing.
distributed
    ``--ray``: the cell jobs on Ray workers (see :mod:`quantus_adapters.cluster`).
store
    Finished result cells on disk, keyed by fingerprint, safe across processes
    (``--resume``).
stats
    Mean ± standard error, the paired test behind table 1's best marks, images needed.
report, sanity, timing
    Tables and figures, the randomisation check, computation times.
"""

from quantus_adapters.benchmark.cli import main

__all__ = ["main"]
