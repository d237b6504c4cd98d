"""``python -m chipo.bandit <experiment> ...`` (same as ``chipo bandit``)."""

from chipo.bandit.cli import main

raise SystemExit(main())
