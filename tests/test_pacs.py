"""The full clinician loop on 127.0.0.1: Orthanc (DICOMweb) up -> phantom studies uploaded -> MONAI Label up with the
DICOMweb datastore -> synthesis through the REST API with a box -> STOW-RS back -> the new series found with the right
tags and no source identifiers -> OHIF (served by MONAI Label) renders the mammogram and the synthetic series in
headless Chromium (Debian ``chromium`` + ``chromium-driver``, driven by Selenium; nothing is downloaded).

Needs the system packages ``orthanc``, ``orthanc-dicomweb``, ``chromium``, ``chromium-driver`` (``make system-deps``,
which ``make test`` runs) and the label environment. Screenshots go to ``$MAMMO_E2E_SCREENSHOTS`` (default
``runs/e2e_screenshots``).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from test_label_app import APP, MODEL, TINY_CONFIGS, Server, _free_port, _label_python, _model_side_files, _tiny_model

REPO = Path(__file__).resolve().parents[1]
PACS = REPO / "custom" / "label_app" / "pacs" / "pacs.py"
ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SYNTHETIC_DESCRIPTION = "SYNTHETIC - mammo_gcdm GCDM"
STARTUP_TIMEOUT = 180


def _require_system_packages() -> None:
    missing = [str(p) for p in (ORTHANC, DICOMWEB_PLUGIN, CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run `make system-deps` (apt packages orthanc orthanc-dicomweb "
                    "chromium chromium-driver)")


def _qido(port: int, path: str) -> list[dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/dicom-web/{path}", timeout=30) as r:
        return json.loads(r.read() or b"[]")


def _value(item: dict, tag: str):
    v = item.get(tag, {}).get("Value", [None])
    return v[0] if len(v) == 1 else v


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def pacs(prepared_dir, tmp_path_factory):
    _require_system_packages()
    label_python = _label_python()
    root = tmp_path_factory.mktemp("pacs")
    studies, models, pacs_dir = root / "studies", root / "models", root / "orthanc"
    models.mkdir()
    res = subprocess.run([sys.executable, str(APP / "make_studies.py"), "--prepared_dir", str(prepared_dir),
                          "--output_dir", str(studies), "--splits", "training,validation,test", "--max_images", "2"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    orthanc_port, label_port = _free_port(), _free_port()
    res = subprocess.run([sys.executable, str(PACS), "start", "--dir", str(pacs_dir), "--port", str(orthanc_port)],
                         capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stdout + res.stderr
    proc = None
    try:
        res = subprocess.run([sys.executable, str(PACS), "upload", "--dir", str(pacs_dir), "--port", str(orthanc_port),
                              "--studies", str(studies), "--decompress"], capture_output=True, text=True, timeout=90)
        assert res.returncode == 0, res.stdout + res.stderr
        _model_side_files(models, Path(prepared_dir))
        _tiny_model(models)
        cmd = [str(label_python), "-m", "monailabel.main", "start_server", "--app", str(APP),
               "--studies", f"http://127.0.0.1:{orthanc_port}/dicom-web", "--uvicorn_app", "custom.label_app.asgi:app",
               "--conf", "models", MODEL, "--conf", "product_python", sys.executable, "--conf", "ckpt_dir", str(models),
               "--conf", "inference_config", ",".join(TINY_CONFIGS), "--conf", "feature_library",
               str(Path(prepared_dir) / "features.csv"), "--conf", "timeout", "300",
               "--host", "127.0.0.1", "--port", str(label_port), "--log_config", str(APP / "logging.json")]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV",
                                                                 "MONAI_LABEL_DICOMWEB_SEARCH_FILTER")}
        env.update(MONAI_LABEL_SESSION_PATH=str(root / "sessions"), MONAI_LABEL_DICOMWEB_CACHE_PATH=str(root / "cache"),
                   OMP_NUM_THREADS="1")
        log = root / "server.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        srv = Server(f"http://127.0.0.1:{label_port}", studies, log, proc, models)
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
        srv.orthanc_port = orthanc_port
        yield srv
    finally:
        if proc is not None:
            _stop(proc)
        subprocess.run([sys.executable, str(PACS), "stop", "--dir", str(pacs_dir)], timeout=60)


def _source_box(path: Path) -> str:
    """A box around the point deepest inside the breast of a mammogram file (x = column)."""
    from scipy import ndimage

    from custom.data.prepare import load_display_image
    from custom.transforms.masks import breast_mask

    display, _ = load_display_image(path)
    depth = ndimage.distance_transform_edt(breast_mask(display))
    cy, cx = np.unravel_index(np.argmax(depth), depth.shape)
    r = max(6, min(display.shape) // 16)
    return f"{cx - r},{cy - r},{cx + r},{cy + r}"


@pytest.fixture(scope="module")
def synthesis(pacs):
    """One synthesis through MONAI Label's REST API on a phantom series of the PACS (what the tests below inspect)."""
    series = _qido(pacs.orthanc_port, "series?Modality=MG&includefield=SeriesDescription&includefield=PatientID")
    originals = [s for s in series if _value(s, "0008103E") != SYNTHETIC_DESCRIPTION]
    assert len(originals) == 2 and len(series) == 2, series
    source = originals[0]
    source_uid, study_uid = _value(source, "0020000E"), _value(source, "0020000D")
    source_pid = _value(source, "00100020")
    import pydicom

    files = {str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID): f for f in pacs.studies.glob("*.dcm")}
    box = _source_box(files[source_uid])
    start = time.time()
    status, body, _ = pacs.infer(source_uid, {"lesion_box": box, "seed": 5, "steps": 3, "result": "json"})
    assert status == 200, (status, body[:500], pacs.log_tail())
    return {"source_uid": source_uid, "study_uid": study_uid, "source_pid": source_pid, "box": box,
            "answer": json.loads(body), "seconds": time.time() - start}


def test_synthetic_series_is_stored_in_the_pacs_with_proper_tags(pacs, synthesis):
    import pydicom

    new_uid = synthesis["answer"]["image_id"]
    assert new_uid != synthesis["source_uid"]
    found = _qido(pacs.orthanc_port, f"series?SeriesInstanceUID={new_uid}&includefield=SeriesDescription")
    assert len(found) == 1 and _value(found[0], "0008103E") == SYNTHETIC_DESCRIPTION
    new_study = _value(found[0], "0020000D")
    # a new study of a SYNTHETIC patient: no source identifier is copied (the clinician sees it as its own study)
    assert new_study != synthesis["study_uid"]
    req = urllib.request.Request(f"http://127.0.0.1:{pacs.orthanc_port}/dicom-web/studies/{new_study}/series/"
                                 f"{new_uid}/metadata")
    with urllib.request.urlopen(req, timeout=30) as r:
        meta = json.loads(r.read())
    assert len(meta) == 1
    ds = pydicom.Dataset.from_json(meta[0])
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] and ds.Modality == "MG"
    assert str(ds.PatientName) == "SYNTHETIC" and ds.PatientID == "SYNTHETIC" and ds.PatientIdentityRemoved == "YES"
    assert ds.BurnedInAnnotation in ("YES", "NO")
    assert synthesis["source_pid"] not in json.dumps(meta[0])               # the source patient's ID appears nowhere
    assert ds.SeriesInstanceUID == new_uid and ds.SOPInstanceUID not in json.dumps(
        _qido(pacs.orthanc_port, f"instances?SeriesInstanceUID={synthesis['source_uid']}"))


def test_synthetic_and_original_are_told_apart_by_dicom_attributes(pacs, synthesis):
    new_uid = synthesis["answer"]["image_id"]
    status, body, _ = pacs.request("POST", "/activelearning/latest_synthetic", json_body={})
    assert status == 200 and json.loads(body)["id"] == new_uid, body[:300]
    originals = {_value(s, "0020000E") for s in _qido(pacs.orthanc_port, "series?includefield=SeriesDescription")
                 if _value(s, "0008103E") != SYNTHETIC_DESCRIPTION}
    assert len(originals) == 2 and synthesis["source_uid"] in originals
    seen = set()
    for _ in range(12):
        status, body, _ = pacs.request("POST", "/activelearning/original", json_body={})
        assert status == 200
        seen.add(json.loads(body)["id"])
    assert seen <= originals and new_uid not in seen


def test_malformed_requests_over_dicomweb_get_4xx_and_leave_no_series(pacs, synthesis):
    before = len(_qido(pacs.orthanc_port, "series"))
    uid, box = synthesis["source_uid"], synthesis["box"]
    cases = [
        pacs.infer("../" + uid, {"lesion_box": box}),
        pacs.infer("/etc/passwd", {"lesion_box": box}),
        pacs.infer("1.2.3.4.5", {"lesion_box": box}),                       # a UID that is not in the PACS
        pacs.infer(uid, {"lesion_box": "0,0,3,3", "steps": 2}),             # outside the breast: the product refuses
        pacs.infer(uid, {"lesion_box": box, "steps": "many"}),
        pacs.infer(uid, {"lesion_box": box, "preset": "no_such_kind"}),
        pacs.request("PUT", f"/datastore/label?image={uid}&tag=..%2F..%2Fx", files={"label": pacs.models / "model.pt"}),
    ]
    for status, body, _ in cases:
        assert 400 <= status < 500, (status, body[:300])
        assert isinstance(json.loads(body)["detail"], str)
    assert len(_qido(pacs.orthanc_port, "series")) == before                # nothing half-written in the PACS
    assert pacs.request("GET", "/info/")[0] == 200


# ------------------------------------------------------------------------------------------------ the viewer
def _screenshots_dir() -> Path:
    out = Path(os.environ.get("MAMMO_E2E_SCREENSHOTS") or REPO / "runs" / "e2e_screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def browser():
    _require_system_packages()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--disable-gpu-sandbox"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


_CANVAS_PIXELS = """
const canvases = Array.from(document.querySelectorAll('canvas.cornerstone-canvas'))
    .filter(c => c.width * c.height > 0);
if (!canvases.length) return null;
const c = canvases.reduce((a, b) => (a.width * a.height >= b.width * b.height ? a : b));
return c.toDataURL('image/png');
"""


def _viewport_stats(driver) -> dict:
    """Pixel statistics of the image OHIF drew: the pixels of its largest cornerstone viewport canvas, read from the
    canvas itself (``toDataURL``), so that overlays, banners and text around it do not count."""
    import base64

    from PIL import Image

    url = driver.execute_script(_CANVAS_PIXELS)
    if not url or "," not in url:
        return {"std": 0.0, "nonblack": 0.0}
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("L"), dtype=np.float64)
    return {"std": float(img.std()), "nonblack": float((img > 20).mean()), "shape": img.shape}


def _open_and_wait(driver, url: str, shot: Path, timeout: float = 150) -> dict:
    driver.get(url)
    deadline = time.time() + timeout
    stats = {"std": 0.0, "nonblack": 0.0}
    while time.time() < deadline:
        stats = _viewport_stats(driver)
        if stats["std"] > 10 and stats["nonblack"] > 0.05:
            break
        time.sleep(2)
    time.sleep(2)  # let the last tiles land before the screenshot
    driver.save_screenshot(str(shot))
    return _viewport_stats(driver) if stats["std"] > 10 else stats


def test_ohif_renders_the_mammogram_and_the_synthetic_series(pacs, synthesis, browser):
    out = _screenshots_dir()
    from selenium.webdriver.common.by import By

    browser.get(pacs.url + "/ohif/")
    deadline = time.time() + 120
    text = ""
    while time.time() < deadline:
        text = browser.find_element(By.TAG_NAME, "body").text
        if "SYNTHETIC" in text and "PHANTOM" in text:
            break
        time.sleep(1)
    browser.save_screenshot(str(out / "ohif_study_list.png"))
    assert "SYNTHETIC" in text and "PHANTOM" in text, text[:500]        # the source study and the synthetic one

    source = _open_and_wait(browser, f"{pacs.url}/ohif/viewer?StudyInstanceUIDs={synthesis['study_uid']}",
                            out / "ohif_source.png")
    assert source["std"] > 10 and source["nonblack"] > 0.05, source  # a mammogram is drawn, not a blank viewport
    new_uid = synthesis["answer"]["image_id"]
    study = _value(_qido(pacs.orthanc_port, f"series?SeriesInstanceUID={new_uid}")[0], "0020000D")
    synthetic = _open_and_wait(browser, f"{pacs.url}/ohif/viewer?StudyInstanceUIDs={study}", out / "ohif_synthetic.png")
    assert synthetic["std"] > 10 and synthetic["nonblack"] > 0.05, synthetic
    body = browser.find_element(By.TAG_NAME, "body").text
    assert SYNTHETIC_DESCRIPTION in body, body[:500]                    # the viewer shows the synthetic series
