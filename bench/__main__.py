"""``python -m bench``: see bench/README.md. ``python -m bench micro``: bench/micro.py.
``python -m bench console``: bench/console.py."""

import contextlib
import sys

with contextlib.suppress(KeyboardInterrupt):
    if sys.argv[1:2] == ["micro"]:
        from .micro import main as micro

        sys.exit(micro(sys.argv[2:]))
    if sys.argv[1:2] == ["console"]:
        from .console import main as console

        sys.exit(console(sys.argv[2:]))
    from .run import main

    sys.exit(main())
