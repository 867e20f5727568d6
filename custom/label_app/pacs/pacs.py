"""A local PACS for the MONAI Label app: Orthanc (Debian packages ``orthanc`` + ``orthanc-dicomweb``) on loopback.

Standard library only (runs in either environment; ``upload --decompress`` needs the product environment)::

    python custom/label_app/pacs/pacs.py start  --dir data/pacs [--port 8042]   # Orthanc, config from orthanc.json
    .venv/bin/python custom/label_app/pacs/pacs.py upload --dir data/pacs --studies data/label_studies --decompress
    python custom/label_app/pacs/pacs.py serve  --dir data/pacs --label_python .venv-label/bin/python \
        --product_python .venv/bin/python --ckpt_dir bundle/models [--label_port 8000]
    python custom/label_app/pacs/pacs.py stop   --dir data/pacs           # the MONAI Label server, then Orthanc

Orthanc answers HTTP only from this machine (``RemoteAccessAllowed: false``), has its DICOM (C-STORE) listener off,
and serves DICOMweb at ``http://127.0.0.1:<port>/dicom-web`` (QIDO-RS, WADO-RS, STOW-RS). Its database and files
live in ``<dir>/storage``; ``<dir>/orthanc.pid`` and ``<dir>/orthanc.log`` are the running server's.

``serve`` starts the MONAI Label server of ``custom/label_app`` on 127.0.0.1 with Orthanc as its DICOMweb datastore
(search filter ``{"Modality": "MG"}``, DICOM cache in ``<dir>/cache``; ``<dir>/label.pid``, ``<dir>/label.log``) and
waits until it answers; OHIF is then at ``http://127.0.0.1:<label_port>/ohif/``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def alive(port: int, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url(port) + "/system", timeout=timeout) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


def write_config(folder: Path, port: int) -> Path:
    storage = folder / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    text = (HERE / "orthanc.json").read_text()
    text = text.replace("@STORAGE@", str(storage)).replace("@HTTP_PORT@", str(int(port))).replace("@PLUGIN@", PLUGIN)
    json.loads(text)  # a valid JSON config
    config = folder / "orthanc.json"
    config.write_text(text)
    return config


def start(folder: Path, port: int, timeout: float = 60.0) -> int:
    """Start Orthanc (no-op when one answers on ``port``); returns its pid (0 when one was already running)."""
    if alive(port):
        if (folder / "orthanc.pid").is_file():
            print(f"Orthanc already runs on {url(port)} (started from {folder})")
            return 0
        raise RuntimeError(f"port {port} answers but is not the Orthanc of {folder} (a system Orthanc service?): "
                           "stop it or choose another port (PACS_PORT=...)")
    exe = "/usr/sbin/Orthanc"
    if not os.path.exists(exe):
        raise FileNotFoundError(f"{exe}: not installed (apt-get install orthanc orthanc-dicomweb)")
    if not os.path.exists(PLUGIN):
        raise FileNotFoundError(f"{PLUGIN}: the DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    folder.mkdir(parents=True, exist_ok=True)
    config = write_config(folder, port)
    log = open(folder / "orthanc.log", "ab")
    proc = subprocess.Popen([exe, str(config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (folder / "orthanc.pid").write_text(str(proc.pid))
    deadline = time.time() + timeout
    while not alive(port):
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with status {proc.returncode}: see {folder / 'orthanc.log'}")
        if time.time() > deadline:
            proc.kill()
            raise TimeoutError(f"Orthanc did not answer on {url(port)} within {timeout:.0f} s")
        time.sleep(0.3)
    print(f"Orthanc {url(port)} (DICOMweb {url(port)}/dicom-web), pid {proc.pid}, storage {folder / 'storage'}")
    return proc.pid


def serve(folder: Path, port: int, label_port: int, label_python: str, product_python: str, ckpt_dir: str,
          timeout: float = 600.0) -> int:
    """Start the MONAI Label server (DICOMweb datastore = this Orthanc) in the background; returns its pid."""
    repo = HERE.parents[2]
    cmd = [label_python, "-m", "monailabel.main", "start_server", "--app", "custom/label_app",
           "--studies", f"{url(port)}/dicom-web", "--uvicorn_app", "custom.label_app.asgi:app",
           "--conf", "models", "mammo_gcdm", "--conf", "product_python", product_python, "--conf", "ckpt_dir", ckpt_dir,
           "--host", "127.0.0.1", "--port", str(label_port), "--log_config", "custom/label_app/logging.json"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.setdefault("MONAI_LABEL_DICOMWEB_SEARCH_FILTER", '{"Modality": "MG"}')
    env.setdefault("MONAI_LABEL_DICOMWEB_CACHE_PATH", str(folder / "cache"))
    log = open(folder / "label.log", "ab")
    proc = subprocess.Popen(cmd, cwd=str(repo), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (folder / "label.pid").write_text(str(proc.pid))
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{label_port}/info/", timeout=5) as r:
                if r.status == 200:
                    break
        except (OSError, urllib.error.URLError):
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the MONAI Label server exited with status {proc.returncode}: see {folder / 'label.log'}")
        if time.time() > deadline:
            raise TimeoutError(f"the MONAI Label server did not answer within {timeout:.0f} s: see {folder / 'label.log'}")
        time.sleep(1)
    print(f"MONAI Label http://127.0.0.1:{label_port} (datastore {url(port)}/dicom-web), pid {proc.pid}")
    print(f"open the viewer: http://127.0.0.1:{label_port}/ohif/")
    return proc.pid


def _stop_pid(pid_file: Path, group: bool) -> bool:
    if not pid_file.is_file():
        return False
    pid = int(pid_file.read_text().strip() or 0)
    pid_file.unlink()
    kill = (lambda sig: os.killpg(pid, sig)) if group else (lambda sig: os.kill(pid, sig))
    try:
        kill(signal.SIGTERM)
    except ProcessLookupError:
        return False
    for _ in range(150):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    try:
        kill(signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def stop(folder: Path) -> bool:
    if _stop_pid(folder / "label.pid", group=True):
        print("MONAI Label server stopped")
    pid_file = folder / "orthanc.pid"
    if not pid_file.is_file():
        return False
    pid = int(pid_file.read_text().strip() or 0)
    pid_file.unlink()
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return True


def _decompressed(path: Path) -> bytes:
    """The file with its pixel data decompressed (lossless: the same pixels) when it is compressed, else as is.

    Orthanc 1.10 (Debian) cannot transcode JPEG 2000, and a WADO-RS request without ``transfer-syntax=*`` (what OHIF
    sends) asks for uncompressed data: a JPEG 2000 instance then fails with HTTP 500 and the viewer stays blank. Needs
    pydicom 3 with the pylibjpeg plugins (the product environment)."""
    import io

    import pydicom

    ds = pydicom.dcmread(path)
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        return path.read_bytes()
    ds.decompress(generate_instance_uid=False)  # lossless: the same instance, same UIDs
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def upload(port: int, files: list[Path], decompress: bool = False) -> int:
    """POST each DICOM file to Orthanc's REST API (``/instances``); returns how many were stored."""
    n = 0
    for f in files:
        data = _decompressed(f) if decompress else f.read_bytes()
        req = urllib.request.Request(url(port) + "/instances", data=data, method="POST",
                                     headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(req, timeout=60) as r:
            status = json.loads(r.read()).get("Status")
        if status not in ("Success", "AlreadyStored"):
            raise RuntimeError(f"{f}: Orthanc answered {status}")
        n += 1
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["start", "upload", "serve", "stop"])
    ap.add_argument("--dir", default="data/pacs", help="Orthanc's folder (storage, config, pid, log)")
    ap.add_argument("--port", type=int, default=8042)
    ap.add_argument("--studies", default="data/label_studies", help="folder of DICOM files to upload")
    ap.add_argument("--decompress", action="store_true",
                    help="upload compressed (JPEG 2000 ...) images decompressed, so that the viewer can show them "
                         "(needs pydicom 3 + pylibjpeg: run with the product environment's python)")
    ap.add_argument("--label_port", type=int, default=8000)
    ap.add_argument("--label_python", default=".venv-label/bin/python")
    ap.add_argument("--product_python", default=".venv/bin/python")
    ap.add_argument("--ckpt_dir", default="bundle/models")
    args = ap.parse_args(argv)
    folder = Path(args.dir).resolve()
    try:
        if args.action == "start":
            start(folder, args.port)
        elif args.action == "serve":
            serve(folder, args.port, args.label_port, args.label_python, args.product_python, args.ckpt_dir)
        elif args.action == "stop":
            print("Orthanc stopped" if stop(folder) else "no Orthanc started from " + str(folder))
        else:
            files = sorted(Path(args.studies).glob("*.dcm"))
            if not files:
                raise FileNotFoundError(f"{args.studies}: no .dcm files (run `make label-studies`)")
            print(f"uploaded {upload(args.port, files, args.decompress)} DICOM files to {url(args.port)}")
    except (OSError, RuntimeError, ValueError, TimeoutError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
