"""Fill a MONAI Label local datastore (a folder) with mammograms of a prepared data set.

Each image of the chosen split(s) of ``<prepared_dir>/datalist.json`` is copied as ``<case_id>.dcm``, so a datastore
image id is the case id used by ``features.csv`` (the app's "copy the lesion features of case X" uses it). Images
already there are left alone; the script uses the standard library only (it runs in either environment)::

    python custom/label_app/make_studies.py --prepared_dir data/prepared --output_dir data/label_studies
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def make_studies(prepared_dir: str | Path, output_dir: str | Path, splits=("test",), max_images: int = 0,
                 lesions_first: bool = True) -> list[Path]:
    prepared = Path(prepared_dir)
    datalist_path = prepared / "datalist.json"
    if not datalist_path.is_file():
        raise FileNotFoundError(f"{datalist_path}: datalist.json not found (run `make prepare`)")
    datalist = json.loads(datalist_path.read_text())
    items = [item for split in splits for item in datalist.get(split, [])]
    if lesions_first:
        items.sort(key=lambda it: -int(it.get("num_lesions", 0) > 0))
    if max_images:
        items = items[: int(max_images)]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for item in items:
        src = Path(item["source_image"])
        if not src.is_absolute() and not src.exists():
            src = prepared.parent.parent / src  # paths relative to the repository root
        if not src.is_file():
            print(f"skipped {item['case_id']}: {src} not found", file=sys.stderr)
            continue
        dest = out / f"{item['case_id']}.dcm"
        if not dest.exists():
            shutil.copyfile(src, dest)
        written.append(dest)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared_dir", default="data/prepared")
    ap.add_argument("--output_dir", default="data/label_studies")
    ap.add_argument("--splits", default="test", help="comma-separated datalist splits (default: test)")
    ap.add_argument("--max_images", type=int, default=0, help="at most this many images (0 = all)")
    args = ap.parse_args(argv)
    try:
        files = make_studies(args.prepared_dir, args.output_dir, [s for s in args.splits.split(",") if s],
                             args.max_images)
    except (OSError, ValueError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    print(f"label studies: {len(files)} mammograms in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
