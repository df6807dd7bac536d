"""Embeddings and hierarchical predictions of image collections, streamed through a Ray Data actor pool
into Parquet files (local or s3://); see docs/embed.md.

The command-line tool lives in ``hierdino/cli/embed.py`` (installed as ``hierdino-embed``); this
script is the documented entry point, also under ``ray job submit --working-dir . -- python jobs/embed.py``.
"""

import sys

from hierdino.cli.embed import main

if __name__ == "__main__":
    sys.exit(main())
