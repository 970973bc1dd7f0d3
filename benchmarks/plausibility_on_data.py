"""How often the plausibility warnings of ``lungseg_utils.mask_warnings`` fire on the data set itself.

    python benchmarks/plausibility_on_data.py     # about a minute once the 256 px cache exists

On the manual masks (which a good model should reproduce) and on the X-rays as they are
and inverted: the lung fraction range of the 704 masks, the masks that draw a warning,
and how well the inversion test separates the 800 X-rays from their inverted copies.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lungseg_utils as L  # noqa: E402


def main() -> None:
    table = L.build_pairs_table(L.find_data_dir())
    print(L.describe_data(table))
    images, _ = L.load_arrays(table, 256)
    margins = np.array([L.inversion_margin(image) for image in images])
    inverted = np.array([L.inversion_margin(255 - image) for image in images])
    print(f"inversion test: flags {(margins < 0).sum()} of {len(images)} X-rays and {(inverted < 0).sum()} of their "
          f"{len(images)} inverted copies; smallest margin {margins.min():.1f} grey levels")
    labeled = L.labeled_only(table)
    label_images, masks = L.load_arrays(labeled, 256)
    low, high = L.lung_fraction_range(masks)
    fractions = masks.reshape(len(masks), -1).mean(axis=1)
    print(f"lung fraction of the {len(masks)} manual masks: min {fractions.min():.3f}, max {fractions.max():.3f} "
          f"(rounded outwards {low:.2f}-{high:.2f}; default range {L.DEFAULT_LUNG_FRACTION_RANGE})")
    flagged = [(name, reasons) for name, mask, image in zip(labeled.name, masks, label_images)
               if (reasons := L.mask_warnings(mask, image))]
    print(f"manual masks with a warning: {len(flagged)} of {len(masks)}")
    for name, reasons in flagged:
        print(f"  {name}: {'; '.join(reasons)}")


if __name__ == "__main__":
    main()
