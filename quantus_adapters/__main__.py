"""``python -m quantus_adapters``: the ``splitxai`` command line (see :mod:`splitxai.cli`)."""

import sys

from splitxai.cli import main

sys.exit(main())
