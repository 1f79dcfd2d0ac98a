"""`python -m samkit` runs the command line."""

from samkit.cli import main

raise SystemExit(main())
