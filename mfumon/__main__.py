"""`python -m mfumon` runs the CLI."""

from mfumon.cli import main

raise SystemExit(main())
