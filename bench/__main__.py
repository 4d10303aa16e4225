"""``python -m bench``: see bench/README.md. ``python -m bench micro``: bench/micro.py."""

import contextlib
import sys

with contextlib.suppress(KeyboardInterrupt):
    if sys.argv[1:2] == ["micro"]:
        from .micro import main as micro

        sys.exit(micro(sys.argv[2:]))
    from .run import main

    sys.exit(main())
