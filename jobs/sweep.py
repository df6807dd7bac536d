"""Ray Tune sweep of the hierarchical-loss hyperparameters, scored on external balanced accuracy (val).

The command-line tool lives in ``hierdino/cli/sweep.py`` (installed as ``hierdino-sweep``); this
script is the documented entry point, also under ``ray job submit --working-dir . -- python jobs/sweep.py``.
"""

import sys

from hierdino.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())
