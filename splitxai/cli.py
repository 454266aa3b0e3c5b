"""The ``splitxai`` console script (also ``python -m splitxai``).

It checks the installation first (a foreign top-level ``core`` package, see
:mod:`splitxai.install`), answers ``--version``, and hands the sub-commands to
:func:`quantus_adapters.cli.main`. Install problems are one line on stderr and exit status 2,
not a traceback. Run as its own process (the console script, ``python -m splitxai``), it
first keeps freed memory in the process for reuse (:mod:`splitxai.allocator`).
"""

from __future__ import annotations

import sys

from splitxai import __version__
from splitxai.allocator import keep_freed_memory
from splitxai.install import ForeignCoreError, MissingExtraError, require_own_core


def main(argv: list[str] | None = None) -> int:
    """Run the ``splitxai`` command line.

    Parameters
    ----------
    argv : list of str, optional
        The arguments without the program name; ``sys.argv[1:]`` when None (the command runs
        as its own process: the allocator is tuned, :mod:`splitxai.allocator`).

    Returns
    -------
    int
        The process exit status.
    """
    if argv is None:
        try:
            keep_freed_memory()
        except ValueError as exc:
            print(f"splitxai: error: {exc}", file=sys.stderr)
            return 2
        argv = sys.argv[1:]
    argv = list(argv)
    if argv[:1] in (["--version"], ["-V"]):
        print(f"splitxai {__version__}")
        return 0
    try:
        require_own_core()
        from quantus_adapters.cli import main as commands
    except (ForeignCoreError, MissingExtraError) as exc:
        print(f"splitxai: error: {exc}", file=sys.stderr)
        return 2
    return commands(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
