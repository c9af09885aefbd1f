"""``python -m jaxprune``: the same as the ``jaxprune`` command."""

import sys

from jaxprune.demo.cli import main

sys.exit(main())
