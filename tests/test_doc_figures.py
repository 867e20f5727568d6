"""Doc figures of custom.engines.figures: the synthetic cohort and the density-control rows, on hand-made folders."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@contextlib.contextmanager
def _titles():
    """Collect every panel title a figure sets (``Axes.set_title`` wrapped for the duration)."""
    import matplotlib.axes

    titles: list[str] = []
    orig = matplotlib.axes.Axes.set_title

    def spy(self, label, *a, **k):
        titles.append(label)
        return orig(self, label, *a, **k)

    matplotlib.axes.Axes.set_title = spy
    try:
        yield titles
    finally:
        matplotlib.axes.Axes.set_title = orig


def _cohort(root: Path, n: int) -> None:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    records = []
    for i in range(n):
        image = np.full((32, 32), 1000 * (i + 1), dtype=np.uint16)
        label = np.zeros((32, 32), dtype=np.uint8)
        label[4:28, 0:20] = 1
        if i % 2:
            label[10:14, 8:12] = 2
        Image.fromarray(image).save(root / "images" / f"s{i}.png")
        Image.fromarray(label).save(root / "labels" / f"s{i}.png")
        records.append({"case_id": f"s{i}", "image": f"images/s{i}.png", "label": f"labels/s{i}.png",
                        "num_lesions": i % 2, "malignancy": "benign" if i % 2 else None})
    (root / "datalist.json").write_text(json.dumps({"training": records[:-1], "validation": records[-1:], "test": []}))
    (root / "synthesis.json").write_text(json.dumps({"identity": {"model_sha256": "ab" * 32}}))


def test_cohort_figure_draws_the_first_images(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from custom.engines import figures

    _cohort(tmp_path / "cohort", 5)
    with _titles() as titles:
        out = figures.cohort_figure(tmp_path / "cohort", tmp_path / "fig" / "cohort.png", n_images=4, columns=3)
    assert out.is_file() and Image.open(out).format == "PNG"
    # the first 4 images in split order (training first), lesion counts from the datalist
    assert titles == ["0 lesions", "1 lesion, benign", "0 lesions", "1 lesion, benign"]
    with pytest.raises(ValueError, match="datalist.json"):
        figures.cohort_figure(tmp_path / "nothing", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    figures.main(["--runs", str(tmp_path / "no_runs"), "--output", str(tmp_path / "docs"), "--cohort", str(tmp_path / "cohort")])
    assert (tmp_path / "docs" / "synthetic_cohort.png").is_file()


def test_density_figure_rows_per_study_and_mask(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from custom.engines import figures

    root = tmp_path / "study"
    (root / "samples" / "density_masks").mkdir(parents=True)
    rows = []
    for case in ("c" * 20, "d" * 20):
        for k, dens in enumerate("ABCD"):
            img = np.full((16, 16), 10000 * (k + 1), dtype=np.uint16)
            Image.fromarray(img).save(root / "samples" / "density_masks" / f"d_{case[:12]}_{dens}_seed0.png")
            rows.append({"case_id": case, "requested": dens, "fraction": 0.1 * (k + 1), "read": dens,
                         "real_density": "B", "real_fraction": 0.3})
    (root / "results.json").write_text(json.dumps({"attribute_fidelity": {"density_with_mask": {"per_case": rows}}}))
    with _titles() as titles:
        out = figures.density_figure([(root, "one"), (root, "two")], tmp_path / "d.png", n_masks=1)
    assert out.is_file()
    # one row per study (first mask only), A..D with the fraction and the class read
    assert titles == ["asked A: 0.10 -> A", "asked B: 0.20 -> B", "asked C: 0.30 -> C", "asked D: 0.40 -> D"] * 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text(json.dumps({"attribute_fidelity": {"skipped": "no attributes"}}))
    with pytest.raises(ValueError, match="density-with-mask"):
        figures.density_figure([(tmp_path / "bad", "x")], tmp_path / "e.png")
    assert not (tmp_path / "e.png").exists()
