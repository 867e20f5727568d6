"""The long-lived synthesis worker (custom/serving/worker.py) writes exactly what the bundle's inference CLI writes.

The worker is the speed change behind the MONAI Label app's interactive latency (the model loaded once instead of a
process per request); it claims the same output, so: same request -> the same pixels as
``python -m monai.bundle run inference``, request after request (no state carried between requests), and input
errors answered as one line while the worker keeps serving.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_label_app import TINY_CONFIGS, _model_side_files, _tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(prepared_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("worker")
    models = root / "models"
    models.mkdir()
    _model_side_files(models, Path(prepared_dir))
    _tiny_model(models)
    datalist = json.loads((Path(prepared_dir) / "datalist.json").read_text())
    item = next(it for split in ("training", "validation", "test") for it in datalist.get(split, [])
                if it.get("num_lesions", 0) > 0)
    args = {"mode": "generate", "mask_file": str(Path(prepared_dir) / item["label"]),
            "lesion_mask_file": str(Path(prepared_dir) / item["lesions"]),  # lesion identity: instance map
            "feature_file": str(Path(prepared_dir) / "features.csv"), "feature_case_id": item["case_id"],
            "case_id": "same", "seed": 3, "ddim_steps": 3, "num_samples": 1, "formats": ["png", "nii"]}
    return {"root": root, "models": models, "args": args}


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im).copy()


def _worker(models: Path):
    from custom.serving.worker import SynthesisWorker

    return SynthesisWorker([str(REPO / f) for f in TINY_CONFIGS], str(models), num_threads=1)


def test_worker_output_equals_the_cli_output(setup):
    root, models, args = setup["root"], setup["models"], setup["args"]
    cli_out = root / "cli"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file",
           "[" + ",".join(repr(str(REPO / f)) for f in TINY_CONFIGS) + "]", "--ckpt_dir", str(models),
           "--output_dir", str(cli_out), "--progress", "False"]
    for key, value in args.items():
        cmd += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]

    worker = _worker(models)
    for k in range(2):  # twice: a second request gets the same pixels (nothing carried over between requests)
        out = root / f"worker{k}"
        worker.infer({**args, "output_dir": str(out)})
        for name in ("same_seed3.png",):
            a, b = _png(cli_out / name), _png(out / name)
            assert a.shape == b.shape and np.array_equal(a, b), (name, k, np.abs(a.astype(float) - b).max())
    import nibabel as nib

    a = np.asarray(nib.load(str(cli_out / "same_seed3.nii.gz")).dataobj)
    b = np.asarray(nib.load(str(root / "worker1" / "same_seed3.nii.gz")).dataobj)
    assert np.array_equal(a, b)
    other = root / "worker_seed4"
    worker.infer({**args, "seed": 4, "output_dir": str(other)})
    assert not np.array_equal(_png(other / "same_seed4.png"), _png(cli_out / "same_seed3.png"))


def test_worker_protocol_answers_errors_and_keeps_serving(setup):
    from custom.serving.worker import serve

    worker = _worker(setup["models"])
    good = {**setup["args"], "output_dir": str(setup["root"] / "protocol")}
    lines = [json.dumps({"id": 1, "op": "infer", "args": {**good, "feature_case_id": "no_such_case"}}),
             "not json",
             json.dumps({"id": 3, "op": "infer", "args": {**good, "ckpt_dir": "/elsewhere"}}),
             json.dumps({"id": 4, "op": "explode", "args": {}}),
             json.dumps({"id": 5, "op": "infer", "args": good})]
    out = io.StringIO()
    serve(worker, io.StringIO("\n".join(lines) + "\n"), out)
    answers = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [a["id"] for a in answers] == [1, None, 3, 4, 5]
    assert [a["ok"] for a in answers] == [False, False, False, False, True]
    assert all(a["kind"] == "input" for a in answers[:4]), answers
    assert "no_such_case" in answers[0]["message"] and "not valid JSON" in answers[1]["message"]
    assert "ckpt_dir" in answers[2]["message"] and "unknown op 'explode'" in answers[3]["message"]
    assert (setup["root"] / "protocol" / "same_seed3.png").is_file()
