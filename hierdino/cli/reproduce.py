"""Reproduce the paper's comparison on the synthetic benchmark: SSL only vs flat CE vs hierarchical CE.

  python jobs/reproduce.py                       # 4 variants x 3 seeds, then evaluation on the test splits
  python jobs/reproduce.py --design v2 --time-budget-min 120   # v2: shared SSL base, 5 variants x 3 seeds, paired
  python jobs/reproduce.py --design v3 --pbc .../PBC_dataset_normal_DIB   # v3: real cells, labels at mixed depths
  python jobs/reproduce.py --seeds 0 --steps 40 --sweep-trials 2 --out runs/repro-smoke   # a quick check
  python jobs/reproduce.py --scale vits14-gpu --time-budget-min 7 --seeds 0 1 \
      --level-weights 0.25,0.3,0.28,0.16 --out runs/repro-vits14   # 224 px ViT-S/14 on one GPU

The design is pre-registered in hierdino/presets/repro/ (read base.yaml). Resumable: finished runs
(an export present) and a finished sweep are skipped when the command is run again.
``--scale NAME`` lays hierdino/presets/repro/scale-NAME.yaml over every variant (model, image size,
resources; never the losses). ``--time-budget-min`` (with no ``--steps``) times a short calibration
run and gives every variant the same number of steps that fits the budget, fixed before any variant
trains. ``--level-weights`` gives variant (d) weights chosen elsewhere instead of sweeping.
Writes OUT/results.md, OUT/results.json and OUT/plots/*.png. The designs' stages live in
hierdino/experiments/ (``v1``, ``v2``, ``v3`` on ``stages``); this module is their command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from hierdino import logs
from hierdino.cli import user_errors
from hierdino.cli.args import upload_dir_problem
from hierdino.experiments import v1, v2, v3
from hierdino.experiments.stages import REPRODUCE, Stopped, render

logger = logging.getLogger(__name__)

DESIGNS = {"v1": v1, "v2": v2, "v3": v3}  # each with its VARIANTS and reproduce(args, probes)


def _parser() -> argparse.ArgumentParser:
    """The command line; its description is this module's docstring."""
    p = argparse.ArgumentParser(prog="reproduce.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="default: runs/repro (v1), runs/repro-v2 (v2)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--design", choices=("v1", "v2", "v3"), default="v1",
                   help="v1: hierdino/presets/repro/ (from scratch); v2: hierdino/presets/repro/v2/ (continued from a "
                        "shared SSL base model, >= 1,500 test images per set, paired bootstrap); v3: "
                        "hierdino/presets/repro/v3/ (real PBC cells, labels at mixed depths; needs --pbc)")
    p.add_argument("--pbc", default=None, help="v3: PBC's published folder (PBC_dataset_normal_DIB) or shards made from it")
    p.add_argument("--base-steps", type=int, default=None, help="v3: override the base model's 1,200 steps (smoke checks only)")
    p.add_argument("--variants", nargs="+", default=None,
                   help="a subset of the design's variants (smoke checks; the comparison needs all of them)")
    p.add_argument("--eval-size", choices=("small", "default"), default="default",
                   help="v2: the suite size of the external sets scored (default: >= 1,500 test images each)")
    p.add_argument("--steps", type=int, default=None, help="override the pre-registered 300 steps (smoke checks only)")
    p.add_argument("--sweep-trials", type=int, default=4)
    p.add_argument("--sweep-steps", type=int, default=None)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--scale", default=None, help="lay hierdino/presets/repro/scale-NAME.yaml over every variant")
    p.add_argument("--time-budget-min", type=float, default=None,
                   help="without --steps: pick the steps per variant that fit this many minutes (timed calibration run)")
    p.add_argument("--eval-reserve-s", type=float, default=None,
                   help="seconds of the budget kept for the evaluation (default: v1 120, v2 1500)")
    p.add_argument("--render", action="store_true", help="only rewrite OUT/results.md and OUT/plots/ from OUT/results.json")
    p.add_argument("--level-weights", type=lambda t: [float(w) for w in t.split(",")], default=None,
                   help="variant (d) weights w1,...,wD chosen elsewhere (e.g. the CPU run's val sweep) instead of sweeping")
    logs.add_flags(p, verbose_help="Ray Data plans, progress bars and Ray's warnings too")
    return p


@user_errors(FileNotFoundError)  # bad paths; bad inputs are UserErrors
def main(argv=None) -> int:
    """Run the comparison (or, with ``--render``, only rewrite its table); returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    logs.console(logs.level_from_flags(args.quiet, args.verbose))
    known = DESIGNS[args.design].VARIANTS
    args.variants = args.variants or list(known)
    unknown = [v for v in args.variants if v not in known]
    if unknown:
        parser.error(f"--variants {' '.join(unknown)}: not in design {args.design} ({', '.join(known)})")
    if args.eval_reserve_s is None:
        args.eval_reserve_s = 120 if args.design == "v1" else 1500
    args.out = args.out or {"v1": "runs/repro", "v2": "runs/repro-v2", "v3": "runs/repro-v3"}[args.design]
    problem = upload_dir_problem(args.out, "--out")  # under `ray job submit --working-dir .`
    if problem:
        parser.error(problem)
    args.out = str(Path(args.out).absolute())
    args.t0 = time.time()
    # scikit-learn: heavy, and --help does not need it
    from hierdino.eval.probes import PROBES

    if args.render:
        return render(args, PROBES)
    try:
        return DESIGNS[args.design].reproduce(args, PROBES)
    except (Stopped, KeyboardInterrupt) as e:
        logger.error(f"stopped{': ' + str(e) if str(e) else ''}. Finished runs are kept; run the same command "
                     "again to go on from where it stopped.", extra=REPRODUCE)
        return 130


if __name__ == "__main__":
    sys.exit(main())
