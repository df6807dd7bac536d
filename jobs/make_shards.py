"""Write datasets in hierdino's shard format (Parquet + manifest.json), locally or to s3://.

The command-line tool lives in ``hierdino/cli/make_shards.py`` (installed as ``hierdino-make-shards``); this
script is the documented entry point, also under ``ray job submit --working-dir . -- python jobs/make_shards.py``.
"""

import sys

from hierdino.cli.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
