"""``python -m mailingest_testbed.alloy_sandbox``: serve the Alloy sandbox in the foreground."""

import sys

from .cli import main

sys.exit(main())
