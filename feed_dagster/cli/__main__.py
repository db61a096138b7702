"""`python -m feed_dagster.cli`: the `feed-dagster` command."""

import sys

from feed_dagster.cli import main

sys.exit(main())
