"""``python -m quantus_adapters``: the ``splitxai`` command line."""

import sys

from quantus_adapters.cli import main

sys.exit(main())
