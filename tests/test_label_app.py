"""The MONAI Label app (custom/label_app): a real server in the label environment, serving a tiny trained model.

The server runs in the label environment made by ``make label-env`` (``<repo>/.venv-label/bin/python``, or the
interpreter named by ``MAMMO_LABEL_PYTHON``) on 127.0.0.1 and a free port, with a local datastore of phantom
mammograms; each synthesis is a subprocess of this (product) interpreter, as in production. Also unit tests of the
app's label / feature handling, which need only numpy & co. and run in this interpreter.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "custom" / "label_app"
TINY_CONFIGS = ["bundle/configs/inference.json"]  # the model keys come from the checkpoints' record
MODEL_CONFIGS = ["bundle/configs/common.json", "tests/configs/ae_tiny.json", "tests/configs/dm_tiny.json"]
MODEL = "mammo_gcdm"
STARTUP_TIMEOUT = 120


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


labels = _module("label_app_labels", APP / "lib" / "labels.py")
features = _module("label_app_features", APP / "lib" / "features.py")


# ================================================================================================ unit: labels
def test_label_rules_and_nifti_orientation(tmp_path):
    import nibabel as nib

    arr = np.zeros((6, 4), dtype=np.uint8)  # rows x columns
    arr[1, 3] = 2
    arr[4, 0] = 1
    nib.save(nib.Nifti1Image(arr.T[:, :, None].copy(), np.eye(4)), str(tmp_path / "l.nii.gz"))  # i = column
    back = labels.read_label(tmp_path / "l.nii.gz")
    assert back.shape == (6, 4) and back[1, 3] == 2 and back[4, 0] == 1

    d = labels.split_label(back)
    assert d.lesion.sum() == 1 and d.lesion[1, 3] and d.breast is not None and d.breast[4, 0]
    single = labels.split_label(np.where(back == 2, 255, 0))  # binary 0/255: the lesion
    assert single.lesion[1, 3] and single.breast is None
    named = labels.split_label(np.where(back == 2, 5, np.where(back == 1, 3, 0)),
                               [{"name": "background_scribbles", "id": 1}, {"name": "breast", "id": 3},
                                {"name": "Lesion", "id": 5}])
    assert named.lesion[1, 3] and named.breast[4, 0] and named.lesion.sum() == 1
    assert not labels.split_label(np.zeros((3, 3), int)).lesion.any()
    with pytest.raises(labels.LabelError, match="not understood"):
        labels.split_label(np.array([[0, 1, 3], [4, 0, 0]]))
    with pytest.raises(labels.LabelError, match="single 2D slice"):
        nib.save(nib.Nifti1Image(np.zeros((3, 3, 2), np.uint8), np.eye(4)), str(tmp_path / "v.nii.gz"))
        labels.read_label(tmp_path / "v.nii.gz")


def test_boxes_roi_and_lesion_count():
    assert labels.parse_boxes("10,20,30,40") == [[10, 20, 30, 40]]
    assert labels.parse_boxes([[1, 2, 3, 4], [5, 6, 7, 8]]) == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert labels.parse_boxes("") is None and labels.parse_boxes(None) is None
    with pytest.raises(labels.LabelError):
        labels.parse_boxes("1,2,3")
    assert labels.roi_to_box([30, 10, 5, 25, 0, 0]) == [10.0, 5.0, 31.0, 26.0]
    assert labels.roi_to_box([]) is None
    m = np.zeros((8, 8), bool)
    m[1, 1] = m[2, 2] = True  # diagonal neighbours: one lesion (8-connectivity, the product's rule)
    m[6, 6] = True
    assert labels.count_lesions(m) == 2


def _preset_files(folder: Path) -> Path:
    from custom.features import FEATURE_NAMES, write_feature_csv

    rows = [{"case_id": name, "lesion_index": 0, **{n: float(k + j) for j, n in enumerate(FEATURE_NAMES)}}
            for k, name in enumerate(["typical", "small_round_benign"])]
    write_feature_csv(folder / "lesion_presets.csv", rows)
    (folder / "lesion_presets.json").write_text(json.dumps({
        "feature_file": "lesion_presets.csv",
        "presets": {"typical": {"description": "any", "count": 9}, "small_round_benign": {"description": "s", "count": 3}}}))
    lib_rows = [{"case_id": "caseA", "lesion_index": i, **{n: float(100 * (i + 1) + j) for j, n in enumerate(FEATURE_NAMES)}}
                for i in range(2)]
    write_feature_csv(folder / "features.csv", lib_rows)
    return folder


def test_request_features_files_are_read_back_by_the_product(tmp_path):
    from custom.features import read_feature_file

    lib = _preset_files(tmp_path)
    out = tmp_path / "request"
    out.mkdir()
    presets = features.PresetLibrary(lib / "lesion_presets.json")
    assert presets.ordered("small_round_benign")[0] == "small_round_benign"
    library = features.FeatureLibrary(lib / "features.csv")

    path, src = features.request_features("small_round_benign", None, 2, out, presets, library, "typical")
    rows = read_feature_file(path)
    assert [r["lesion_index"] for r in rows] == [0, 1] and rows[0]["original_shape2D_Elongation"] == 1.0
    assert src["tag"] == "small_round_benign"
    path, src = features.request_features(None, None, 1, out, presets, library, "typical")
    assert src["preset"] == "typical"
    path, src = features.request_features(None, "caseA", 2, out, presets, library, "typical")
    assert [r["original_shape2D_Elongation"] for r in read_feature_file(path)] == [100.0, 200.0]
    path, _ = features.request_features(None, "caseA:1", 1, out, presets, library, "typical")
    assert read_feature_file(path)[0]["original_shape2D_Elongation"] == 200.0
    values = {r: 1.5 for r in read_feature_file(path)[0] if r not in ("case_id", "lesion_index")}
    path, src = features.request_features(None, json.dumps(values), 1, out, presets, library, "typical")
    assert read_feature_file(path)[0]["original_firstorder_Mean"] == 1.5 and src["tag"] == "custom"
    with pytest.raises(features.FeatureError, match="unknown preset 'nope'; choose one of: typical"):
        features.request_features("nope", None, 1, out, presets, library, "typical")
    with pytest.raises(features.FeatureError, match="2 lesion\\(s\\) of case 'caseA' are given for 3 drawn"):
        features.request_features(None, "caseA", 3, out, presets, library, "typical")
    with pytest.raises(features.FeatureError, match="has no lesion in the feature library"):
        features.request_features(None, "caseB", 1, out, presets, library, "typical")


def test_synthetic_marker_matches_what_the_product_writes():
    """The strategies find synthetic images by the SeriesDescription the product writes (no datastore flag): the
    app's marker must start the product's description and must not match the phantom's own images."""
    import re

    from custom.data.export import SERIES_DESCRIPTION
    from custom.data.phantom import PHANTOM_SERIES_DESCRIPTION

    text = (APP / "lib" / "strategies.py").read_text()
    marker = re.search(r'^SYNTHETIC_SERIES = "([^"]+)"', text, re.M).group(1)
    assert SERIES_DESCRIPTION.startswith(marker)
    assert not PHANTOM_SERIES_DESCRIPTION.startswith(marker)


# ================================================================================================ server fixture
def _label_python() -> Path:
    env = os.environ.get("MAMMO_LABEL_PYTHON")
    path = Path(env) if env else REPO / ".venv-label" / "bin" / "python"
    if not path.exists():
        pytest.fail(f"MONAI Label environment not found at {path}: run `make label-env` (or set MAMMO_LABEL_PYTHON)")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_side_files(folder: Path, prepared: Path) -> None:
    """What the server reads at start: the feature normaliser and the lesion presets of the prepared data."""
    from custom.features.presets import make_presets

    shutil.copyfile(prepared / "feature_normalisation.json", folder / "feature_normalisation.json")
    make_presets(prepared, folder, min_members=1)


def _tiny_model(folder: Path) -> None:
    """Random (perturbed) networks of the tiny test configuration, saved as a trained model folder."""
    import torch
    from monai.bundle import ConfigParser

    from custom.checkpoints import save_checkpoint, save_stage1
    from custom.workflows.bundle import model_record

    parser = ConfigParser()
    parser.read_config([str(REPO / f) for f in MODEL_CONFIGS])
    parser["device"] = "$torch.device('cpu')"
    torch.manual_seed(0)
    ae_record = parser.get_parsed_content("autoencoder_record")
    save_stage1(folder / "autoencoder.pt", parser.get_parsed_content("autoencoder_def"), scale_factor=0.8,
                model_config=model_record(ae_record))
    net = parser.get_parsed_content("network_def")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # MONAI zero-initialises the UNet's output conv: random weights make the output vary
        for q in net.parameters():
            q.add_(torch.randn(q.shape, generator=g) * 0.05)
    save_checkpoint(folder / "model.pt", {"model": net.state_dict(), "model_config": model_record(
        ae_record, parser.get_parsed_content("diffusion_record"))})


class Server:
    def __init__(self, url: str, studies: Path, log: Path, proc: subprocess.Popen, models: Path):
        self.url, self.studies, self.log, self.proc, self.models = url, studies, log, proc, models

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def request(self, method: str, path: str, fields=None, files=None, json_body=None, timeout: float = 240):
        data, headers = None, {}
        if json_body is not None:
            data, headers = json.dumps(json_body).encode(), {"Content-Type": "application/json"}
        elif fields is not None or files is not None:
            boundary = uuid.uuid4().hex
            buf = io.BytesIO()
            for k, v in (fields or {}).items():
                buf.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
            for k, p in (files or {}).items():
                buf.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{Path(p).name}"\r\n'
                          f'Content-Type: application/octet-stream\r\n\r\n'.encode())
                buf.write(Path(p).read_bytes())
                buf.write(b"\r\n")
            buf.write(f"--{boundary}--\r\n".encode())
            data, headers = buf.getvalue(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            return err.code, err.read(), err.headers.get("Content-Type", "")

    def json(self, path: str):
        status, body, _ = self.request("GET", path)
        assert status == 200, (status, body[:500], self.log_tail())
        return json.loads(body)

    def infer(self, image: str, params: dict, label: Path | None = None, output: str | None = None,
              timeout: float = 240):
        q = f"/infer/{MODEL}?image={urllib.parse.quote(image)}" + (f"&output={output}" if output else "")
        return self.request("POST", q, fields={"params": json.dumps(params)}, files={"label": label} if label else {},
                            timeout=timeout)


@pytest.fixture(scope="module")
def server(prepared_dir, tmp_path_factory):
    label_python = _label_python()
    root = tmp_path_factory.mktemp("label_app")
    models, studies = root / "models", root / "studies"
    models.mkdir()
    _model_side_files(models, Path(prepared_dir))
    res = subprocess.run([sys.executable, str(APP / "make_studies.py"), "--prepared_dir", str(prepared_dir),
                          "--output_dir", str(studies), "--splits", "training,validation,test", "--max_images", "2"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and len(list(studies.glob("*.dcm"))) == 2, res.stdout + res.stderr
    port = _free_port()
    cmd = [str(label_python), "-m", "monailabel.main", "start_server", "--app", str(APP), "--studies", str(studies),
           "--uvicorn_app", "custom.label_app.asgi:app",
           "--conf", "models", MODEL, "--conf", "product_python", sys.executable,
           "--conf", "ckpt_dir", str(models), "--conf", "inference_config", ",".join(TINY_CONFIGS),
           "--conf", "feature_library", str(Path(prepared_dir) / "features.csv"), "--conf", "timeout", "200",
           "--conf", "queue_size", "1",
           "--host", "127.0.0.1", "--port", str(port), "--log_config", str(APP / "logging.json")]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(MONAI_LABEL_SESSION_PATH=str(root / "sessions"), MONAI_LABEL_DATASTORE_AUTO_RELOAD="false",
               OMP_NUM_THREADS="1")
    log = root / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", studies, log, proc, models)
    try:
        _tiny_model(models)  # while the server starts: the weights are read by each synthesis, not at start
        deadline = time.time() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the MONAI Label server exited with status {proc.returncode}:\n{srv.log_tail()}")
            try:
                if srv.request("GET", "/info/", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the MONAI Label server did not answer within {STARTUP_TIMEOUT} s:\n{srv.log_tail()}")
            time.sleep(0.5)
        yield srv
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="module")
def scene(server):
    """The first datastore image, its display values, and lesion / outside-the-breast label files."""
    import nibabel as nib
    from scipy import ndimage

    from custom.data.prepare import load_display_image
    from custom.transforms.masks import breast_mask

    image_id = sorted(p.stem for p in server.studies.glob("*.dcm"))[0]
    display, _ = load_display_image(server.studies / f"{image_id}.dcm")
    breast = breast_mask(display)
    depth = ndimage.distance_transform_edt(breast)
    cy, cx = np.unravel_index(np.argmax(depth), depth.shape)  # the point deepest inside the breast
    away = ndimage.distance_transform_edt(~breast)
    oy, ox = np.unravel_index(np.argmax(away), away.shape)   # the background point farthest from the breast
    h, w = display.shape
    r = max(6, min(h, w) // 16)
    yy, xx = np.mgrid[:h, :w]
    lesion = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    outside = (yy - oy) ** 2 + (xx - ox) ** 2 <= (r // 2) ** 2
    folder = server.models.parent

    def nifti(name: str, arr: np.ndarray) -> Path:  # as 3D Slicer writes a 2D label: (columns, rows, 1)
        path = folder / name
        nib.save(nib.Nifti1Image(np.ascontiguousarray(arr.astype(np.uint8).T[:, :, None]), np.eye(4)), str(path))
        return path

    slicer = np.zeros((h, w), np.uint8)  # segments as the Slicer scribbles panel exports them
    slicer[lesion] = 3
    slicer[oy, ox] = 1  # a background scribble, ignored
    return {
        "id": image_id, "display": display, "lesion": lesion, "center": (cy, cx), "radius": r,
        "lesion_label": nifti("lesion.nii.gz", lesion * 2),
        "outside_label": nifti("outside.nii.gz", outside * 2),
        "empty_label": nifti("empty.nii.gz", np.zeros((h, w))),
        "slicer_label": nifti("slicer.nii.gz", slicer),
    }


def _far_from(scene, margin_fraction: float = 0.3) -> np.ndarray:
    """Pixels farther than the lesion radius + a margin covering the dilated (latent-cell) keep region at the tiny
    model's 32-pixel resolution."""
    h, w = scene["display"].shape
    cy, cx = scene["center"]
    yy, xx = np.mgrid[:h, :w]
    far = scene["radius"] + margin_fraction * max(h, w)
    return (yy - cy) ** 2 + (xx - cx) ** 2 > far * far


def _datastore_dicom(server, image_id: str) -> np.ndarray:
    import pydicom

    status, body, _ = server.request("GET", f"/datastore/image?image={urllib.parse.quote(image_id)}")
    assert status == 200, (status, body[:300])
    ds = pydicom.dcmread(io.BytesIO(body))
    assert str(ds.PatientName) == "SYNTHETIC" and str(ds.SeriesDescription).startswith("SYNTHETIC")
    return ds.pixel_array.astype(np.float64) / 65535.0


# ================================================================================================ integration
def test_info_lists_the_model_and_its_presets(server):
    info = server.json("/info/")
    model = info["models"][MODEL]
    presets = json.loads((server.models / "lesion_presets.json").read_text())["presets"]
    assert set(model["presets"]) == set(presets) and "typical" in presets
    assert model["presets"]["typical"]["description"] == presets["typical"]["description"]
    assert model["config"]["preset"][0] == "typical" and set(model["config"]["preset"]) == set(presets)
    assert model["config"]["mode"] == ["keep", "whole"] and model["dimension"] == 2
    assert info["labels"] == {"breast": 1, "lesion": 2}
    assert {"original", "latest_synthetic"} <= set(info["strategies"])
    first = sorted(p.stem for p in server.studies.glob("*.dcm"))[0]
    status, body, _ = server.request("POST", "/activelearning/original", json_body={"image": first})
    assert status == 200 and json.loads(body)["id"] == first and json.loads(body)["name"] == f"{first}.dcm"


def test_keep_mode_synthesis_is_returned_and_saved(server, scene):
    import nibabel as nib

    preset = "typical"
    status, body, ctype = server.infer(scene["id"], {"preset": preset, "seed": 1, "steps": 3},
                                       scene["lesion_label"], output="image")
    assert status == 200, (status, body[:500], server.log_tail())
    out_file = server.models.parent / "returned.nii.gz"
    out_file.write_bytes(body)
    out = np.asarray(nib.load(str(out_file)).dataobj, dtype=np.float64).squeeze().T
    display = scene["display"]
    assert out.shape == display.shape                               # on the source grid of the input
    diff = np.abs(out - display)
    far = _far_from(scene)
    # outside the lesion region the mammogram is kept (up to the round trip through the tiny 32-px model frame);
    # a regenerated image differs by ~0.2 on average
    assert diff[far].mean() < 0.02, diff[far].mean()
    assert diff[scene["lesion"]].mean() > 2 * diff[far].mean() + 0.02   # the region itself is new content

    new_id = f"{scene['id']}_synthetic_{preset}_s1"
    listing = server.json("/datastore/?output=all")
    assert new_id in listing["objects"], sorted(listing["objects"])
    info = listing["objects"][new_id]["image"]["info"]
    assert info["synthetic"] is True and info["source_image"] == scene["id"] and info["seed"] == 1
    assert info["features"]["preset"] == preset and info["sidecar"]["synthetic"] is True
    assert (server.studies / f"{new_id}.dcm").is_file()
    saved = _datastore_dicom(server, new_id)
    assert saved.shape == out.shape and np.abs(saved - out).max() < 1e-3   # the DICOM is the returned image
    status, body, _ = server.request("POST", "/activelearning/latest_synthetic", json_body={})
    assert status == 200, body[:300]
    latest = json.loads(body)
    assert latest["id"] == new_id and latest["name"] == f"{new_id}.dcm"


def test_slicer_style_request_other_seed_changes_only_the_region(server, scene):
    params = {"preset": "typical", "seed": "2", "steps": "3", "roi": [], "selected_label_name": "foreground_scribbles",
              "label_info": [{"name": "background_scribbles", "id": 1}, {"name": "foreground_scribbles", "id": 2},
                             {"name": "lesion", "id": 3}]}
    status, body, ctype = server.infer(scene["id"], params, scene["slicer_label"])
    assert status == 200, (status, body[:500], server.log_tail())
    assert ctype.startswith("application/json")                    # Slicer gets JSON, the image goes to the datastore
    res = json.loads(body)
    assert res["image_id"] == f"{scene['id']}_synthetic_typical_s2" and res["n_lesions"] == 1
    two = _datastore_dicom(server, res["image_id"])
    one = _datastore_dicom(server, f"{scene['id']}_synthetic_typical_s1")
    far = _far_from(scene)
    assert np.array_equal(one[far], two[far])                       # outside the region: the same pixels exactly
    assert np.abs(one - two)[scene["lesion"]].mean() > 0.01          # inside: another seed, another lesion


def test_whole_mode_follows_the_source_breast_when_only_the_lesion_is_drawn(server, scene):
    from scipy import ndimage

    from custom.transforms.masks import breast_mask

    status, body, ctype = server.infer(scene["id"], {"preset": "typical", "mode": "whole", "seed": 4, "steps": 3,
                                                     "result": "json"}, scene["lesion_label"])
    assert status == 200, (status, body[:500], server.log_tail())
    res = json.loads(body)
    assert res["image_id"] == f"{scene['id']}_synthetic_whole_typical_s4" and res["mode"] == "whole"
    info = server.json(f"/datastore/image/info?image={res['image_id']}")
    assert info["breast"] == "found in the source image" and info["sidecar"]["parameters"]["mode"] == "generate"
    out = _datastore_dicom(server, res["image_id"])
    display = scene["display"]
    assert out.shape == display.shape
    breast = breast_mask(display)
    rows, cols = np.nonzero(breast)
    pad = max(display.shape) // 10
    box = np.zeros(display.shape, bool)
    box[max(rows.min() - pad, 0): rows.max() + pad, max(cols.min() - pad, 0): cols.max() + pad] = True
    # the image is generated inside the breast region of the source only: beyond it (a margin past the breast's
    # bounding box) nothing is drawn
    assert (~box).any() and out[~box].max() == 0.0
    tissue = ndimage.binary_erosion(breast, iterations=3) & _far_from(scene)
    assert np.abs(out - display)[tissue].mean() > 0.05                   # a whole new image, not the source


def test_errors_are_readable_and_the_server_keeps_serving(server, scene):
    status, body, _ = server.infer("no_such_image", {"preset": "typical"}, scene["lesion_label"])
    assert status == 404 and "no_such_image" in json.loads(body)["detail"] and "not found" in json.loads(body)["detail"]

    status, body, _ = server.infer(scene["id"], {"preset": "typical"}, scene["empty_label"])
    assert status == 400 and "the label is empty" in json.loads(body)["detail"]

    status, body, _ = server.infer(scene["id"], {"preset": "no_such_kind"}, scene["lesion_label"])
    detail = json.loads(body)["detail"]
    assert status == 400 and "unknown preset 'no_such_kind'" in detail and "typical" in detail

    status, body, _ = server.infer(scene["id"], {"preset": "typical", "seed": 3, "steps": 2}, scene["outside_label"])
    detail = json.loads(body)["detail"]
    assert status == 400, (status, detail)
    assert detail.startswith("the drawn lesion: lesion 0 lies outside the breast"), detail  # the product's message
    assert "mammo_label_" not in detail                                # no server temp paths

    assert server.request("GET", "/info/")[0] == 200
    objects = server.json("/datastore/?output=all")["objects"]
    assert not [k for k in objects if "_s3" in k]                      # a failed request stores nothing


def test_attributes_and_prompt_params_reach_the_products_parser(server, scene):
    """``attributes`` / ``prompt`` request params: the form is checked by the app, names/values/words by the product's
    parser (custom.data.attributes), each a 400 with one readable sentence; nothing is stored."""
    box = {"lesion_box": "10,10,20,20", "steps": 2, "seed": 7}
    cases = [  # (params, words the detail must contain)
        ({"attributes": "colour=red"}, ["attributes", "unknown attribute 'colour'", "view"]),
        ({"attributes": "view=AP"}, ["attributes", "unknown value 'AP'", "CC, MLO"]),
        ({"attributes": {"density": "Z"}}, ["unknown value 'Z'", "'density'"]),
        ({"attributes": "view"}, ["expected name=value"]),
        ({"prompt": "a mammogram in MLO view with purple density"}, ["prompt", "unknown word 'purple'"]),
        ({"prompt": "a CC mammogram in MLO view"}, ["prompt", "contradicts"]),
        ({"attributes": "view=CC", "prompt": "an MLO mammogram"}, ["contradicts"]),
        # valid names and values, but the test model reads no attributes: refused, never ignored
        ({"attributes": "view=MLO,density=D"}, ["not trained with attribute(s) view, density"]),
        ({"prompt": "a siemens mammogram with high density"}, ["not trained with attribute(s)"]),
        # the app's own form check: nothing that could become a configuration expression reaches the product
        ({"attributes": "$__import__('os').getcwd()"}, ["attributes: at most 300 characters"]),
        ({"prompt": "@network_def"}, ["prompt: at most 300 characters"]),
        ({"attributes": ["view=MLO"]}, ["attributes must be text"]),
        ({"attributes": {"view": "M,LO"}}, ["plain word"]),
        ({"prompt": "mlo " * 100}, ["at most 300"]),
        # per-lesion labels: the product's parser, then the model (which reads none)
        ({"lesion_labels": "birads=9"}, ["lesion_labels", "unknown value '9'"]),
        ({"lesion_labels": [{"birads": "none"}]}, ["lesion_labels", "remove"]),
        ({"lesion_labels": "birads=4; birads=5"}, ["trained without lesion labels"]),
        ({"lesion_labels": "birads=4"}, ["lesion_labels", "trained without lesion labels"]),
        ({"lesion_labels": "$@network_def"}, ["lesion_labels: at most 300 characters"]),
        ({"lesion_labels": ["birads=4"]}, ["one object per lesion"]),
        ({"lesion_labels": [{"birads": "4;5"}]}, ["plain word"]),
    ]
    for extra, words in cases:
        status, body, _ = server.infer(scene["id"], {**box, **extra})
        detail = json.loads(body)["detail"]
        assert status == 400, (extra, status, detail)
        assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail, (extra, detail)
        for w in words:
            assert w in detail, (extra, w, detail)
    objects = server.json("/datastore/?output=all")["objects"]
    assert not [k for k in objects if "_s7" in k]                      # a refused request stores nothing
    info = server.json("/info/")["models"][MODEL]["config"]
    assert "attributes" in info and "prompt" in info and "lesion_labels" in info


# ================================================================================================ access rules (issue 8)
def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


def test_requests_cannot_reach_outside_the_datastore(server, scene):
    q = urllib.parse.quote
    outside = server.models.parent / "outside"
    outside.mkdir(exist_ok=True)
    secret = outside / "secret.dcm"
    shutil.copyfile(server.studies / f"{scene['id']}.dcm", secret)   # a valid mammogram, but not in the datastore
    before_outside, before_store = _snapshot(outside), _snapshot(server.studies)
    box = {"lesion_box": "10,10,20,20", "steps": 2, "seed": 9}
    rel = os.path.relpath(outside, server.studies)
    cases = [
        ("infer: absolute path as image", server.infer(str(secret), box)),
        ("infer: relative path as image", server.infer(f"../{scene['id']}", box)),
        ("infer: image set in params", server.infer(scene["id"], {**box, "image": str(secret)})),
        ("infer: label set in params", server.infer(scene["id"], {"label": str(secret), "steps": 2})),
        ("infer: label path in params", server.infer(scene["id"], {"label": "/etc/passwd", "steps": 2})),
        ("label: tag traversal", server.request("PUT", f"/datastore/label?image={scene['id']}&tag={q(rel + '/x')}",
                                                files={"label": scene["lesion_label"]})),
        ("label: tag ../", server.request("PUT", f"/datastore/label?image={scene['id']}&tag={q('../../x')}",
                                          files={"label": scene["lesion_label"]})),
        ("label: image traversal", server.request("PUT", f"/datastore/label?image={q(rel + '/y')}&tag=final",
                                                  files={"label": scene["lesion_label"]})),
        ("image: id traversal", server.request("PUT", f"/datastore/image?image={q(rel + '/z')}",
                                               files={"file": secret})),
        ("get label: tag traversal", server.request("GET", f"/datastore/label?label={scene['id']}&tag={q('../..')}")),
        ("get image: absolute", server.request("GET", f"/datastore/image?image={q(str(secret))}")),
        ("delete label: tag traversal", server.request("DELETE", f"/datastore/label?id={scene['id']}&tag={q('../..')}")),
        ("delete image: traversal", server.request("DELETE", f"/datastore/image?id={q('../' + scene['id'])}")),
        ("image info: traversal", server.request("GET", f"/datastore/image/info?image={q('../x')}")),
    ]
    for what, (status, body, _) in cases:
        assert 400 <= status < 500, (what, status, body[:300])
        assert isinstance(json.loads(body)["detail"], str), (what, body[:300])
    assert _snapshot(outside) == before_outside                    # nothing written (or replaced) outside
    assert _snapshot(server.studies) == before_store               # nor anything stored in the datastore
    status, body, _ = server.request("GET", "/ohif/..%2F..%2F..%2F..%2Fetc%2Fpasswd")
    assert b"root:" not in body                                     # the viewer's fallback page, never the file


def test_malformed_requests_get_4xx_with_a_readable_message(server, scene):
    image = scene["id"]
    box = '"lesion_box": "10,10,20,20"'
    raw_params = ["{bad json", "[1, 2]", "null", '{"seed": 1e400, ' + box + "}", '{"steps": "nan", ' + box + "}",
                  '{"steps": 1e12, ' + box + "}", '{"steps": 2.5, ' + box + "}", '{"guidance_scale": NaN, ' + box + "}",
                  '{"guidance_scale": Infinity, ' + box + "}", '{"guidance_scale": "-inf", ' + box + "}",
                  '{"seed": 1e30, ' + box + "}", '{"seed": -1, ' + box + "}", '{"seed": [1], ' + box + "}",
                  '{"mode": {"a": 1}, ' + box + "}", '{"lesion_box": "1e400,0,1,1"}', '{"lesion_box": [[[1]]]}',
                  '{"format": "exe", ' + box + "}", '{"preset": "no_such_kind", ' + box + "}", "{}"]
    requests = [("POST", f"/infer/{MODEL}?image={image}", {"fields": {"params": p}}) for p in raw_params]
    requests += [
        ("POST", f"/infer/no_such_model?image={image}", {"fields": {"params": "{}"}}),
        ("POST", f"/infer/{MODEL}", {"fields": {"params": "{" + box + "}"}}),
        ("POST", f"/infer/{MODEL}?image={image}&output=dicom_seg", {"fields": {"params": "{" + box + "}"}}),
        ("POST", f"/infer/{MODEL}?image={image}&output=bogus", {"fields": {"params": "{" + box + "}"}}),
        ("POST", f"/infer/{MODEL}?session_id=nope", {"fields": {"params": "{}"}}),
        ("POST", f"/infer/{MODEL}?image={image}", {"fields": {"params": "{}"}, "files": {"file": scene["lesion_label"]}}),
        ("POST", "/infer/wsi/mammo_gcdm?image=x", {"json_body": {}}),
        ("PUT", f"/datastore/image/info?image={image}", {"fields": {"info": "not json"}}),
        ("PUT", "/datastore/image/info?image=nope", {"fields": {"info": "{}"}}),
        ("PUT", f"/datastore/label/info?label={image}&tag=final", {"fields": {"info": "{bad"}}),
        ("PUT", f"/datastore/updatelabelinfo?label={image}&tag=final", {"fields": {"info": "[]"}}),
        ("DELETE", "/datastore/image?id=nope", {}),
        ("GET", "/datastore/?output=bogus", {}),
        ("POST", "/activelearning/no_such_strategy", {"json_body": {}}),
        ("POST", "/activelearning/original", {"json_body": {"image": "../x"}}),
        ("POST", "/train/no_such_model", {"json_body": {}}),
        ("POST", "/scoring/no_such_method", {"json_body": {}}),
        ("POST", "/batch/infer/no_such_model", {"json_body": {}}),
        ("PUT", f"/model/{MODEL}", {"files": {"file": scene["lesion_label"]}}),
        ("PUT", "/session/", {"files": {"files": scene["lesion_label"]}}),
        ("GET", "/proxy/dicom/qido/studies", {}),
    ]
    if shutil.which("nvidia-smi") is None:
        requests.append(("GET", "/logs/gpu", {}))
    for method, path, kw in requests:
        status, body, _ = server.request(method, path, **kw)
        assert 400 <= status < 500, (method, path, kw, status, body[:300])
        detail = json.loads(body)["detail"]
        assert detail and (isinstance(detail, str) or isinstance(detail, list)), (path, body[:300])
    objects = server.json("/datastore/?output=all")["objects"]
    assert not [k for k in objects if "_s9" in k or k.startswith("nope")]
    assert server.request("GET", "/info/")[0] == 200                # still serving


def test_other_requests_are_answered_while_syntheses_queue(server, scene):
    import threading

    results: dict[str, tuple] = {}
    (cy, cx), r = scene["center"], scene["radius"]
    box = f"{cx - r},{cy - r},{cx + r},{cy + r}"                     # inside the breast

    def synthesise(name: str, seed: int) -> None:
        # 100 steps (the tiny model's maximum): with the model kept loaded, 3 steps end before the next request is
        # even queued, and the queue states below would never be seen
        results[name] = server.infer(scene["id"], {"lesion_box": box, "seed": seed, "steps": 100, "result": "json"})

    def queue_state() -> dict:
        return server.json("/info/")["queue"]

    def wait_for(predicate, what: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while not predicate():
            assert time.time() < deadline, f"timed out waiting for {what}: {queue_state()}\n{server.log_tail()}"
            time.sleep(0.02)

    first = threading.Thread(target=synthesise, args=("first", 11))
    first.start()
    wait_for(lambda: queue_state()["running"] == 1, "the first synthesis to start")
    second = threading.Thread(target=synthesise, args=("second", 12))
    second.start()
    wait_for(lambda: queue_state()["waiting"] == 1, "the second synthesis to queue")
    # while one synthesis runs and one waits (queue_size 1): a third is refused at once, other requests are answered
    status, body, _ = server.infer(scene["id"], {"lesion_box": box, "seed": 13, "steps": 3}, timeout=30)
    assert status == 429 and json.loads(body)["detail"].startswith("busy:"), (status, body[:300])
    assert first.is_alive()
    for path in ("/info/", "/datastore/?output=all", f"/datastore/image/info?image={scene['id']}"):
        status, _, _ = server.request("GET", path, timeout=10)
        assert status == 200, path
    status, _, _ = server.request("POST", "/activelearning/original", json_body={"image": scene["id"]}, timeout=10)
    assert status == 200
    assert first.is_alive() or second.is_alive()                     # answered while the syntheses were still going
    first.join(300)
    second.join(300)
    for name, seed in (("first", 11), ("second", 12)):
        status, body, _ = results[name]
        assert status == 200, (name, status, body[:300], server.log_tail())
        assert json.loads(body)["seed"] == seed
    assert queue_state() == {"running": 0, "waiting": 0, "queue_size": 1}


_GUARD_PROBE = r"""
import json, os, sys
sys.argv = ["probe"]
from starlette.testclient import TestClient
from custom.label_app.asgi import app
out = {}
for base in ("http://127.0.0.1", "http://10.1.2.3"):
    client = TestClient(app, base_url=base)  # no lifespan: the guard answers before the app is needed
    r = client.get("/no_such_page")
    out[base] = [r.status_code, r.json().get("detail")]
print(json.dumps(out))
"""


@pytest.mark.parametrize("auth", [False, True])
def test_non_loopback_access_needs_monai_label_authentication(auth):
    probe = _GUARD_PROBE
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["MONAI_LABEL_AUTH_ENABLE"] = "true" if auth else "false"
    res = subprocess.run([str(_label_python()), "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["http://127.0.0.1"][0] == 404                        # loopback: reaches MONAI Label (no such page)
    if auth:
        assert out["http://10.1.2.3"][0] == 404                     # authentication on: MONAI Label's own checks
    else:
        status, detail = out["http://10.1.2.3"]
        assert status == 403 and "without authentication" in detail and "MONAI_LABEL_AUTH_ENABLE" in detail
