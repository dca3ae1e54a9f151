"""``python -m lightnet_ops.bench``: see lightnet_ops.bench.cli."""

import sys

from .cli import main

sys.exit(main())
