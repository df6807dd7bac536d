"""Write datasets in hierdino's shard format (Parquet + manifest.json), locally or to s3://.

  python jobs/make_shards.py synth  --out URI [--size small|default] [--image-size N] [--seed S]
  python jobs/make_shards.py folder --root DIR --source matek_aml_2019 --out URI/NAME [--skip-bad]
  python jobs/make_shards.py csv    --csv FILE --source bone_marrow_2021 --out URI/NAME [--skip-bad]
  python jobs/make_shards.py pbc    --root .../PBC_dataset_normal_DIB --out URI/NAME [--split-fractions 0.6,0.2,0.2]
  python jobs/make_shards.py kaggle-blood-cells --root .../dataset2-master/images --out URI/NAME
  python jobs/make_shards.py raabin --root DIR_OF_Train_TestA_TestB --out URI/NAME
  python jobs/make_shards.py lisc   --root ".../LISC Database" --out URI/NAME [--split-fractions 0.6,0.2,0.2]
  python jobs/make_shards.py bloodmnist --npz .../bloodmnist.npz --out URI/NAME
  python jobs/make_shards.py matek  --root .../AML-Cytomorphology_LMU --out URI/NAME [--split-fractions ...]

Labels go through a named label map (``hierdino/hierarchies/label_maps.yaml`` or ``--label-maps``);
unknown labels fail before anything is written. A dataset without splits of its own is all train,
or ``--split-fractions TRAIN,VAL,TEST`` draws each image's split from a hash of (``--split-seed``,
its path relative to the root), or of its ``--group-by REGEX`` group: adding images moves none.
S3 settings: ``--s3-endpoint`` / ``--s3-region`` or the standard AWS environment variables.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from hierdino import logs
from hierdino.data import layouts, shards, suite
from hierdino.errors import user_errors
from hierdino.hierarchy import load_hierarchy
from hierdino.labels import get_label_map
from hierdino.storage import StorageOptions

logger = logging.getLogger(__name__)


def _add_synth(sub) -> None:
    s = sub.add_parser("synth", help="the synthetic benchmark suite")
    s.add_argument("--out", required=True, help="directory or s3:// prefix; datasets go to OUT/<name>/")
    s.add_argument("--size", choices=["small", "default"], default="small")
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=None)
    s.add_argument("--only", nargs="*", default=None, help=f"subset of {', '.join(suite.SUITE_NAMES)}")


def _add_common(a: argparse.ArgumentParser, hierarchy: str, source_help: str | None) -> None:
    """Arguments of every dataset sub-command; ``source_help`` None: ``--source`` is required."""
    a.add_argument("--source", required=source_help is None, default=None,
                   help=source_help or "label map name, e.g. matek_aml_2019")
    a.add_argument("--out", required=True, help="dataset directory or s3:// prefix")
    a.add_argument("--name", default=None, help="dataset name (default: last part of --out)")
    a.add_argument("--hierarchy", default=hierarchy, help=f"tree the labels are mapped to (default {hierarchy})")
    a.add_argument("--label-maps", default=None, help="a label-map YAML instead of the packaged one")
    a.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of failing")
    a.add_argument("--target-file-mb", type=float, default=128.0)
    g = a.add_argument_group("splits of a dataset without its own")
    g.add_argument("--split-fractions", default=None, metavar="TRAIN,VAL,TEST",
                   help="e.g. 0.6,0.2,0.2 (zeros allowed, sum 1): per image from a hash of (seed, relative path)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of --split-fractions (default 0)")
    g.add_argument("--group-by", default=None, metavar="REGEX",
                   help="keep images of one group in one split: the group is the first capture group "
                        "(or the whole match) of REGEX searched in the relative path, e.g. '^[^/]+/([^/]+)/'")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make_shards.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--s3-endpoint", default=None)
    p.add_argument("--s3-region", default=None)
    logs.add_flags(p)
    sub = p.add_subparsers(dest="cmd", required=True)
    _add_synth(sub)
    a = sub.add_parser("folder", help="an image folder (one sub-folder per class)")
    a.add_argument("--root", required=True)
    a.add_argument("--split", default=None, choices=shards.SPLITS,
                   help="the split of every image (default train); not for a root of train/val/test folders")
    _add_common(a, "wbc-h1", None)
    a = sub.add_parser("csv", help="a CSV path,label[,split]")
    a.add_argument("--csv", required=True)
    _add_common(a, "wbc-h1", None)
    for name, layout in layouts.LAYOUTS.items():
        a = sub.add_parser(name, help=layout.help)
        if name == "bloodmnist":
            a.add_argument("--npz", required=True, help="bloodmnist.npz (any MedMNIST size)")
        else:
            a.add_argument("--root", required=True)
        maps = ", ".join(f"{s} on {t}" for t, s in layout.sources.items())
        _add_common(a, layout.hierarchy, f"label map (default: {maps})")
    for a in sub.choices.values():  # --quiet / --verbose also after the sub-command, as every other job takes them
        logs.add_flags(a, default=argparse.SUPPRESS)
    return p


def _split_spec(args: argparse.Namespace) -> shards.SplitSpec | None:
    """The ``--split-fractions`` / ``--split-seed`` / ``--group-by`` of a command, if any."""
    if args.split_fractions is None:
        if args.group_by is not None:
            raise shards.ShardError("--group-by needs --split-fractions")
        return None
    return shards.SplitSpec(shards.parse_split_fractions(args.split_fractions), args.split_seed, args.group_by)


def _items(args: argparse.Namespace, lm) -> list[shards.Item]:
    """The command's images, each with its split."""
    spec = _split_spec(args)
    if args.cmd == "csv":
        return shards.csv_items(args.csv, lm, None, spec)
    if args.cmd == "folder":
        return shards.folder_items(args.root, lm, args.split, spec)
    where = args.npz if args.cmd == "bloodmnist" else args.root
    return layouts.layout_items(args.cmd, where, lm, spec)


@user_errors(ValueError, OSError)
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.console(logs.level_from_flags(args.quiet, args.verbose))
    opts = StorageOptions(endpoint=args.s3_endpoint, region=args.s3_region)
    t0 = time.time()
    if args.cmd == "synth":
        logger.info(f"building the synthetic suite ({args.size}, {args.image_size} px, seed {args.seed}) into "
                    f"{args.out}", extra=logs.PLAIN)
        names = tuple(args.only) if args.only else suite.SUITE_NAMES
        ms = suite.build_suite(args.out, args.size, args.image_size, args.seed, args.workers, names, opts)
        n = sum(m.num_images for m in ms.values())
        print(f"wrote {n} images in {len(ms)} datasets in {time.time() - t0:.1f}s")
        return 0
    h = load_hierarchy(args.hierarchy)
    source = args.source or layouts.source_for(args.cmd, h.name)
    lm = get_label_map(source, h, args.label_maps)
    items = _items(args, lm)
    name = args.name or args.out.rstrip("/").rsplit("/", 1)[-1]
    m = shards.write_items(items, args.out, name, lm, args.skip_bad, h, args.target_file_mb, opts)
    print(f"wrote {m.num_images} images of {name} ({len(m.shards)} shard(s)) to {args.out} in {time.time() - t0:.1f}s")
    for split, per in sorted(m.counts.items(), key=lambda kv: shards.SPLITS.index(kv[0])):
        print(f"  {split}: " + ", ".join(f"{lab} {n}" for lab, n in per.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
