"""`python -m vmmd` is the `vmmd` command."""

from vmmd.cli.main import main

raise SystemExit(main())
