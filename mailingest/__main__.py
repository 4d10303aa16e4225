from mailingest.application.cli import main

raise SystemExit(main())
