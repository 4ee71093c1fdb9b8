"""``python -m gateway`` is the ``mailgate`` command."""

import sys

from gateway.cli import main

sys.exit(main())
