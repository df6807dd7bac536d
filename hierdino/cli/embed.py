"""Embed every image of shard datasets or image folders with a model; optionally classify them with the
run's supervised head (hierarchical calls). Parquet files under --out, resumable (docs/embed.md).

  python jobs/embed.py --model runs/pbc-cpu --data s3://bucket/pbc --out s3://bucket/emb/pbc
  python jobs/embed.py --model runs/pbc-cpu --data /data/cells/ --out emb/ --predict --calibrate s3://bucket/pbc
  python jobs/embed.py --model vit_small_patch14_dinov2=/weights/dinobloom-s.pth --data /data/cells --out emb/ --dtype float32

Models: what jobs/evaluate.py takes (run directories, exported .safetensors, '<timm arch>[@size]=<weights>',
'random:<arch>[@size]', 'pixels'). Data: shard-format dataset URIs, or folders / s3:// prefixes of image
files (the path under the folder is the image id).
"""

from __future__ import annotations

import argparse
import logging
import sys

from hierdino import logs
from hierdino.cli.evaluate import _positive
from hierdino.errors import user_errors
from hierdino.eval.embed import DTYPES, EmbedOptions, check_writable, run_embed, summary_text
from hierdino.eval.features import resolve_model
from hierdino.runtime import init_ray
from hierdino.storage import StorageOptions

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="embed.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", nargs="+", required=True, metavar="SRC", help="shard datasets, image folders or s3:// prefixes")
    p.add_argument("--out", required=True, help="a folder or s3:// prefix for the Parquet files")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="of the embedding columns")
    p.add_argument("--patch-mean", action="store_true", help="also the mean patch token (column patch_mean)")
    p.add_argument("--predict", action="store_true", help="leaf/node probabilities, top-3 leaves and the hierarchical "
                                                          "call from the run's supervised head")
    p.add_argument("--calibrate", metavar="URI", help="with --predict: a labelled shard dataset; tau is chosen on its "
                                                       "--calibrate-split for --target-precision")
    p.add_argument("--calibrate-split", default="val")
    p.add_argument("--target-precision", type=float, default=0.95)
    p.add_argument("--tau", type=float, default=None, help="with --predict and no --calibrate: the threshold (default 0.5)")
    p.add_argument("--center-crop", type=float, default=None, metavar="SHARE",
                   help="the centred SHARE of each side the model sees (default: what the run trained on, else 1)")
    p.add_argument("--img-size", type=_positive, default=224, help="input size of '<arch>=<weights>' models without '@size'")
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--actors", type=_positive, default=None, help="default: one per GPU, else the CPUs less one")
    p.add_argument("--gpus-per-actor", type=float, default=None, help="fractions allowed; default 1 on GPU clusters")
    p.add_argument("--files-per-part", type=_positive, default=1024, help="images of a folder per output file")
    p.add_argument("--s3-endpoint", default=None)
    p.add_argument("--s3-region", default=None)
    logs.add_flags(p, verbose_help="Ray Data plans, progress bars and Ray's warnings too")
    return p


@user_errors(ValueError, OSError)
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logs.console(logs.level_from_flags(args.quiet, args.verbose))
    if args.calibrate and not args.predict:
        raise ValueError("--calibrate chooses the threshold of --predict's calls: add --predict")
    if args.tau is not None and args.calibrate:
        raise ValueError("give --tau or --calibrate, not both")
    options = StorageOptions(endpoint=args.s3_endpoint, region=args.s3_region)
    check_writable(args.out, options)  # before the weights are read: a bad --out or missing credentials said first
    model = resolve_model(args.model, args.img_size, options)
    center = args.center_crop if args.center_crop is not None else model.center_crop or 1.0
    if not 0 < center <= 1:
        raise ValueError(f"--center-crop must lie in (0, 1], got {center}")
    o = EmbedOptions(args.dtype, args.patch_mean, args.predict, args.calibrate, args.calibrate_split,
                     args.target_precision, args.tau, center, args.batch_size, args.actors, args.gpus_per_actor,
                     args.files_per_part)
    init_ray(verbose=args.verbose)
    logger.info(summary_text(run_embed(model, args.data, args.out, o, options)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
