"""``python -m rnnreg`` is the ``rnnreg`` command."""

import sys

from rnnreg.cli import main

sys.exit(main())
