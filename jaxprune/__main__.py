"""``python -m jaxprune``: the same as the ``jaxprune`` command."""

import sys

from jaxprune.demo import main

sys.exit(main())
