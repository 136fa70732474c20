"""``python -m runtime.cli``: the same as the ``voxloop`` command."""

import sys

try:
    from runtime.cli import main
except KeyboardInterrupt:  # Ctrl-C while starting up
    sys.exit(130)

sys.exit(main())
