"""Lesion presets (custom.features.presets): grouping of hand-made training lesions by size, shape and BI-RADS,
median feature vectors, the written feature file / description file, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from custom.errors import MammoInputError
from custom.features import FEATURE_NAMES, read_feature_file, write_feature_csv
from custom.features.presets import (
    ELONGATION_FEATURE,
    SIZE_FEATURE,
    SPHERICITY_FEATURE,
    build_presets,
    fit_thresholds,
    load_training_lesions,
    make_presets,
    malignancy_from_birads,
)

REPO = Path(__file__).resolve().parents[1]

# (case, lesion_index, max diameter, sphericity, elongation, birads): 9 training lesions whose grouping is known.
#   size terciles of [5,6,7 | 15,16,17 | 30,31,32] -> q1 = 7 + (15-7)*(8/3 - 2) = 12.33.., q2 = 17 + (30-17)*(16/3-5) = 21.33..
#   sphericity lower tercile of [.5,.55,.6, .9x6] -> 0.6 + (0.9-0.6)*(8/3-2) = 0.8 -> the three <= 0.8 are irregular
#   elongation median of the six regular ones [.95,.96,.97,.5,.6,.7] -> (0.7 + 0.95) / 2 = 0.825
LESIONS = [
    ("a", 0, 5.0, 0.90, 0.95, "BI-RADS 2"),   # small round benign
    ("b", 0, 6.0, 0.92, 0.96, "BI-RADS 3"),   # small round benign
    ("c", 0, 7.0, 0.91, 0.97, "BI-RADS 3"),   # small round benign
    ("d", 0, 15.0, 0.90, 0.50, "BI-RADS 4"),  # medium oval malignant
    ("d", 1, 16.0, 0.93, 0.60, "BI-RADS 5"),  # medium oval malignant
    ("e", 0, 17.0, 0.94, 0.70, "BI-RADS 4"),  # medium oval malignant
    ("f", 0, 30.0, 0.50, 0.40, "BI-RADS 5"),  # large irregular malignant
    ("g", 0, 31.0, 0.55, 0.45, "BI-RADS 4"),  # large irregular malignant
    ("h", 0, 32.0, 0.60, 0.42, "BI-RADS 0"),  # large irregular, BI-RADS unknown
]


def _row(case, idx, diameter, sph, elo, k):
    """A full 67-feature row: the three grouping features set, every other feature = a distinct value of k."""
    feats = {n: float(k * 10 + j) for j, n in enumerate(FEATURE_NAMES)}
    feats.update({SIZE_FEATURE: diameter, SPHERICITY_FEATURE: sph, ELONGATION_FEATURE: elo})
    return {"case_id": case, "lesion_index": idx, **feats}


@pytest.fixture()
def prepared(tmp_path) -> Path:
    """A hand-made prepared folder: the 9 training lesions above, plus a validation case that must be ignored."""
    rows = [_row(c, i, d, s, e, k) for k, (c, i, d, s, e, _) in enumerate(LESIONS)]
    rows.append(_row("val", 0, 100.0, 0.1, 0.1, 99))
    write_feature_csv(tmp_path / "features.csv", rows)
    training = {}
    for c, i, *_, birads in LESIONS:
        item = training.setdefault(c, {"case_id": c, "findings": [], "geometry": {"output_shape": [256, 256]}})
        item["findings"].append({"category": "Mass", "birads": birads, "lesion_index": i, "box": [0, 0, 1, 1]})
    datalist = {"training": list(training.values()),
                "validation": [{"case_id": "val", "findings": [{"birads": "BI-RADS 5", "lesion_index": 0}]}],
                "test": []}
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    return tmp_path


def test_malignancy_from_birads():
    assert [malignancy_from_birads(b) for b in ("BI-RADS 2", "BI-RADS 3", "3", 4, "BI-RADS 4A", "BI-RADS 5")] == [
        "benign", "benign", "benign", "malignant", "malignant", "malignant"]
    assert [malignancy_from_birads(b) for b in (None, "BI-RADS 0", "BI-RADS 1", "n/a")] == [None, None, None, None]


def test_training_lesions_only_with_their_birads(prepared):
    records, info = load_training_lesions(prepared)
    assert [r.key for r in records] == [f"{c}:{i}" for c, i, *_ in LESIONS]
    assert [r.birads for r in records] == [b for *_, b in LESIONS]
    assert info["image_size"] == 256


def test_thresholds_and_grouping(prepared):
    records, _ = load_training_lesions(prepared)
    th = fit_thresholds(records)
    assert th.size_q1 == pytest.approx(7 + 8 * (8 / 3 - 2))
    assert th.size_q2 == pytest.approx(17 + 13 * (16 / 3 - 5))
    assert th.sphericity_q1 == pytest.approx(0.8)
    assert th.elongation_median == pytest.approx(0.825)
    assert [th.size(r) for r in records] == ["small"] * 3 + ["medium"] * 3 + ["large"] * 3
    assert [th.shape(r) for r in records] == ["round"] * 3 + ["oval"] * 3 + ["irregular"] * 3

    presets, _ = build_presets(records, min_members=2, image_size=256)
    by_name = {p.name: p for p in presets}
    assert list(by_name) == [
        "small_round_benign", "medium_oval_malignant", "large_irregular_malignant",   # level 1, fixed order
        "round_benign", "oval_malignant", "irregular_malignant",                      # level 2
        "typical_benign", "typical_malignant", "typical",
    ]
    assert by_name["small_round_benign"].members == ["a:0", "b:0", "c:0"]
    assert by_name["large_irregular_malignant"].members == ["f:0", "g:0"]   # h has no usable BI-RADS
    assert by_name["typical"].count == 9 and by_name["typical_malignant"].count == 5
    assert "Small (max diameter <= 12.3 px at 256 px), round benign" in by_name["small_round_benign"].description
    assert "median features of 3 training lesions" in by_name["small_round_benign"].description

    # min_members drops the two-lesion group but keeps the larger ones
    names3 = [p.name for p in build_presets(records, min_members=3)[0]]
    assert "large_irregular_malignant" not in names3 and "small_round_benign" in names3


def test_preset_features_are_per_feature_medians(prepared):
    records, _ = load_training_lesions(prepared)
    presets, _ = build_presets(records, min_members=2)
    p = {q.name: q for q in presets}
    medium = p["medium_oval_malignant"].features     # lesions k = 3, 4, 5
    assert medium[SIZE_FEATURE] == 16.0 and medium[ELONGATION_FEATURE] == pytest.approx(0.6)
    j = FEATURE_NAMES.index("original_firstorder_Mean")
    assert medium["original_firstorder_Mean"] == 40.0 + j        # median of 30+j, 40+j, 50+j
    pair = p["large_irregular_malignant"].features    # lesions k = 6, 7: median of two = their mean
    assert pair[SIZE_FEATURE] == 30.5 and pair["original_firstorder_Mean"] == 65.0 + j
    everyone = np.median([[r.features[n] for n in FEATURE_NAMES] for r in records], axis=0)
    assert [p["typical"].features[n] for n in FEATURE_NAMES] == pytest.approx(everyone.tolist())


def test_written_files_work_as_a_feature_file(prepared, tmp_path):
    out = tmp_path / "models"
    paths = make_presets(prepared, out, min_members=2)
    rows = read_feature_file(paths["csv"])             # the inference feature-file reader accepts it
    assert [r["case_id"] for r in rows][:3] == ["small_round_benign", "medium_oval_malignant", "large_irregular_malignant"]
    assert all(r["lesion_index"] == 0 for r in rows)
    meta = json.loads(paths["json"].read_text())
    assert meta["feature_file"] == "lesion_presets.csv"
    assert set(meta["presets"]) == {r["case_id"] for r in rows}
    assert meta["presets"]["small_round_benign"]["count"] == 3
    assert meta["presets"]["small_round_benign"]["description"].startswith("Small")
    assert meta["source"]["n_lesions"] == 9


def test_cli_and_errors(prepared, tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run([sys.executable, "-m", "custom.features.presets", "--prepared_dir", str(prepared),
                          "--output_dir", str(out), "--min_members", "3"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "small_round_benign" in res.stdout and (out / "lesion_presets.csv").is_file()
    bad = subprocess.run([sys.executable, "-m", "custom.features.presets", "--prepared_dir", str(tmp_path / "nope"),
                          "--output_dir", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.startswith("ERROR: ") and "datalist.json not found" in bad.stderr
    with pytest.raises(MammoInputError, match="no preset has enough member lesions"):
        make_presets(prepared, tmp_path / "none", min_members=50)
