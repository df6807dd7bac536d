"""Pretrain a DINOv2 student/teacher with hierarchical supervision on Ray Train.

The command-line tool lives in ``hierdino/cli/pretrain.py`` (installed as ``hierdino-pretrain``); this
script is the documented entry point, also under ``ray job submit --working-dir . -- python jobs/pretrain.py``.
"""

import sys

from hierdino.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
