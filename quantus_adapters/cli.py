"""The sub-commands of the ``splitxai`` command line (the script itself is :mod:`splitxai.cli`).

Sub-commands
------------
benchmark
    The paper's evaluation (section 5) on a built-in or user model and data set.
explain
    Bulk explanations of a data set (one ``.npz`` per image and method), optionally on Ray.
train-dc
    Train difference-of-monotone / difference-of-convex models (appendix D).
"""

from __future__ import annotations

import sys

from quantus_adapters.cli_common import EXIT_OK, EXIT_USAGE, one_line
from splitxai.install import MissingExtraError, require_extra

#: the modules ``splitxai benchmark`` imports (Quantus metrics, baselines, data, figures)
BENCHMARK_MODULES = ("quantus", "captum", "zennit", "torchvision", "sklearn", "matplotlib",
                     "skimage", "scipy")

USAGE = """usage: splitxai {benchmark,explain,train-dc} [options]
       splitxai --version

sub-commands:
  benchmark   evaluate Split methods and baselines with Quantus (splitxai benchmark --help)
  explain     write the maps of many images and methods to disk (splitxai explain --help)
  train-dc    train DM/DIC models on digits or MNIST (splitxai train-dc --help)
"""


def main(argv: list[str] | None = None) -> int:
    """Run the ``splitxai`` command line.

    Parameters
    ----------
    argv: list of str, optional
        The arguments without the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        The process exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return EXIT_OK if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    if command == "benchmark":
        try:
            require_extra(BENCHMARK_MODULES, "benchmark", "splitxai benchmark")
        except MissingExtraError as exc:
            print(f"splitxai: error: {one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
        from quantus_adapters.benchmark.cli import main as benchmark_main

        return int(benchmark_main(rest) or 0)
    if command == "explain":
        from quantus_adapters.explain_cli import main as explain_main

        return int(explain_main(rest) or 0)
    if command == "train-dc":
        from core.dc.train import main as train_main

        return int(train_main(rest) or 0)
    print(f"splitxai: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
