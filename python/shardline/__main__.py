"""`python -m shardline`: the `shardline` command, for where its script is not on PATH."""

import sys

from shardline.cli import main

sys.exit(main())
