"""Product-environment helper: the automatic breast mask of a mammogram, as a 0/255 PNG on the image's own grid.

Run by the label app (``<product python> custom/label_app/lib/breast_mask.py --image_file X --output Y``) for
"whole image" synthesis when the clinician drew only the lesion: the new image then follows the breast outline of
the source mammogram. It uses the product's own functions (the ``prepare`` display pipeline and breast detection,
the same ones keep mode uses), so the outline is the one ``prepare`` would find.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--image_file", required=True)
    ap.add_argument("--output", required=True)
    args = ap.parse_args(argv)

    import numpy as np
    from PIL import Image

    from custom.data.prepare import load_display_image
    from custom.errors import MammoInputError
    from custom.transforms.masks import breast_mask

    try:
        image, _ = load_display_image(args.image_file)
        breast = breast_mask(image)
        if not breast.any():
            raise MammoInputError(args.image_file, "no breast found in the image: draw the breast too")
    except MammoInputError as err:
        print(f"ERROR: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    Image.fromarray(breast.astype(np.uint8) * 255).save(args.output)
    print(f"breast mask: {int(breast.sum())} pixels of {breast.size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
