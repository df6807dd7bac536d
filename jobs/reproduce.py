"""Reproduce the paper's comparison on the synthetic benchmark: SSL only vs flat CE vs hierarchical CE.

The command-line tool lives in ``hierdino/cli/reproduce.py`` (installed as ``hierdino-reproduce``); this
script is the documented entry point, also under ``ray job submit --working-dir . -- python jobs/reproduce.py``.
"""

import sys

from hierdino.cli.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
