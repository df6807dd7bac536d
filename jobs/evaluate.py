"""Evaluate frozen models on external datasets: k-NN and logistic-regression probes, balanced

The command-line tool lives in ``hierdino/cli/evaluate.py`` (installed as ``hierdino-evaluate``); this
script is the documented entry point, also under ``ray job submit --working-dir . -- python jobs/evaluate.py``.
"""

import sys

from hierdino.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
