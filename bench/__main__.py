"""``python -m bench``: see bench/README.md."""

import contextlib
import sys

from .run import main

with contextlib.suppress(KeyboardInterrupt):
    sys.exit(main())
