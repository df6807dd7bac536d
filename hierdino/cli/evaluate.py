"""Evaluate frozen models on external datasets: k-NN and logistic-regression probes, balanced
accuracy with bootstrap intervals, hierarchical metrics, a Markdown table and plots.

  python jobs/evaluate.py --model runs/tiny-cpu --out report/
  python jobs/evaluate.py --model runs/ssl --model runs/flat --model runs/hxe --baselines --split test --out report/
  python jobs/evaluate.py --model vit_small_patch14_dinov2=/weights/dinobloom-s.pth --datasets s3://bucket/acevedo --out report/

Models: run directories, exported .safetensors, '<timm arch>[@size]=<weights>', 'random:<arch>[@size]', 'pixels'.
Datasets: shard-format URIs or names of the synthetic suite (found under --suite).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hierdino import logs
from hierdino.data.suite import EXTERNAL_SETS, resolve_dataset
from hierdino.errors import user_errors
from hierdino.eval.features import features_in_process, resolve_model
from hierdino.eval.probes import ALL_PROBES, PROBES
from hierdino.eval.report import evaluate, markdown_table
from hierdino.runtime import init_ray


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


@user_errors(ValueError, OSError)
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="repeatable")
    p.add_argument("--datasets", nargs="+", default=list(EXTERNAL_SETS))
    p.add_argument("--suite", default="~/.cache/hierdino/synth", help="where suite names are found")
    p.add_argument("--split", choices=["val", "test"], default="test")
    p.add_argument("--out", required=True)
    p.add_argument("--probes", nargs="+", choices=ALL_PROBES, default=list(PROBES),
                   help="logreg: standardised features, C chosen on val (on train CV when --split val); "
                        "logreg_raw: the paper's raw-feature protocol, C = dim x classes / 100")
    p.add_argument("--bootstrap", type=_positive, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metric", choices=["euclidean", "cosine"], default="euclidean", help="k-NN distance")
    p.add_argument("--patch-mean", action="store_true", help="concatenate the mean patch token to CLS")
    p.add_argument("--baselines", action="store_true", help="also a random backbone of the first model's arch and raw pixels")
    p.add_argument("--hierarchy", action="append", default=[], metavar="YAML",
                   help="the tree of sets whose manifests name it without holding it (sets written by earlier "
                        "versions with a hierarchy of your own); repeatable")
    p.add_argument("--center-crop", type=float, default=None, metavar="SHARE",
                   help="every model sees the centred SHARE of each side of the images (default: what the first "
                        "model trained on, from its model.json; else 1, the whole image)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--features", choices=("auto", "ray", "local"), default="auto",
                   help="where features are computed: a Ray Data actor pool, this process, or auto (this process on "
                        "a one-node cluster without GPUs)")
    logs.add_flags(p, verbose_help="Ray Data plans, progress bars and Ray's warnings too")
    args = p.parse_args(argv)
    logs.console(logs.level_from_flags(args.quiet, args.verbose))
    if args.bootstrap < 1000:
        print(f"note: --bootstrap {args.bootstrap} is below the 1000 resamples the reports assume", file=sys.stderr)
    models = list(args.model)
    first = resolve_model(models[0])
    center = args.center_crop if args.center_crop is not None else first.center_crop or 1.0
    if not 0 < center <= 1:
        raise ValueError(f"--center-crop must lie in (0, 1], got {center}")
    if args.baselines:
        if first.kind == "backbone":
            models.append(f"random:{first.arch}@{first.img_size}")
        if "pixels" not in models:
            models.append("pixels")
    suite = str(Path(os.path.expanduser(args.suite)))
    datasets = [resolve_dataset(d, suite) for d in args.datasets]
    init_ray(verbose=args.verbose)
    res = evaluate(models, datasets, args.out, args.split, tuple(args.probes), args.bootstrap, args.seed, args.metric,
                   args.patch_mean, plots=not args.no_plots, in_process=features_in_process(args.features),
                   hierarchies=tuple(args.hierarchy), center_crop=center)
    print(markdown_table(res))
    print(f"wrote {args.out}/results.json, {args.out}/results.md and {len(res.get('plots', []))} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
