"""``python -m tenure``: the ``tenure`` command."""

import sys

from .cli import main

sys.exit(main())
