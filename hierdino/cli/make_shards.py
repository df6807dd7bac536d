"""Write datasets in hierdino's shard format (Parquet + manifest.json), locally or to s3://.

  python jobs/make_shards.py synth  --out URI [--size small|default] [--image-size N] [--seed S]
  python jobs/make_shards.py folder --root DIR --source matek_aml_2019 --out URI/NAME [--skip-bad]
  python jobs/make_shards.py csv    --csv FILE --source bone_marrow_2021 --out URI/NAME [--skip-bad]

Labels go through a named label map (``hierdino/hierarchies/label_maps.yaml`` or ``--label-maps``);
unknown labels fail before anything is written. S3 settings: ``--s3-endpoint`` / ``--s3-region``
or the standard AWS environment variables.
"""

from __future__ import annotations

import argparse
import sys
import time


from hierdino.cli import user_errors
from hierdino.data import shards, suite
from hierdino.storage import StorageOptions
from hierdino.hierarchy import load_hierarchy
from hierdino.labels import get_label_map


@user_errors(ValueError, OSError)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make_shards.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--s3-endpoint", default=None)
    p.add_argument("--s3-region", default=None)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="the synthetic benchmark suite")
    s.add_argument("--out", required=True, help="directory or s3:// prefix; datasets go to OUT/<name>/")
    s.add_argument("--size", choices=["small", "default"], default="small")
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=None)
    s.add_argument("--only", nargs="*", default=None, help=f"subset of {', '.join(suite.SUITE_NAMES)}")
    for name in ("folder", "csv"):
        a = sub.add_parser(name, help="an image folder (one sub-folder per class)" if name == "folder" else "a CSV path,label[,split]")
        if name == "folder":
            a.add_argument("--root", required=True)
            a.add_argument("--split", default=None, choices=shards.SPLITS,
                           help="the split of every image (default train); not for a root of train/val/test folders")
        else:
            a.add_argument("--csv", required=True)
        a.add_argument("--source", required=True, help="label map name, e.g. matek_aml_2019")
        a.add_argument("--out", required=True, help="dataset directory or s3:// prefix")
        a.add_argument("--name", default=None, help="dataset name (default: last part of --out)")
        a.add_argument("--hierarchy", default="wbc-h1")
        a.add_argument("--label-maps", default=None, help="a label-map YAML instead of the packaged one")
        a.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of failing")
        a.add_argument("--target-file-mb", type=float, default=128.0)
    args = p.parse_args(argv)
    opts = StorageOptions(endpoint=args.s3_endpoint, region=args.s3_region)
    t0 = time.time()
    if args.cmd == "synth":
        print(f"building the synthetic suite ({args.size}, {args.image_size} px, seed {args.seed}) into {args.out}")
        names = tuple(args.only) if args.only else suite.SUITE_NAMES
        ms = suite.build_suite(args.out, args.size, args.image_size, args.seed, args.workers, names, opts)
        n = sum(m.num_images for m in ms.values())
        print(f"wrote {n} images in {len(ms)} datasets in {time.time() - t0:.1f}s")
        return 0
    h = load_hierarchy(args.hierarchy)
    lm = get_label_map(args.source, h, args.label_maps)
    items = shards.folder_items(args.root, lm, args.split) if args.cmd == "folder" else shards.csv_items(args.csv, lm)
    name = args.name or args.out.rstrip("/").rsplit("/", 1)[-1]
    m = shards.write_items(items, args.out, name, lm, args.skip_bad, h, args.target_file_mb, opts)
    print(f"wrote {m.num_images} images of {name} ({len(m.shards)} shard(s)) to {args.out} in {time.time() - t0:.1f}s")
    for split, per in m.counts.items():
        print(f"  {split}: " + ", ".join(f"{lab} {n}" for lab, n in per.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
