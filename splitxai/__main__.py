"""``python -m splitxai``: the ``splitxai`` command line."""

import sys

from splitxai.cli import main

sys.exit(main())
