"""``python -m runtime.cli``: the same as the ``voxloop`` command."""

import sys

from runtime.cli import main

sys.exit(main())
