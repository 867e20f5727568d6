"""MONAI Label app of mammo_gcdm: draw a lesion on a mammogram, choose a lesion kind, get a synthetic mammogram.

Start (from the repository root, in the label environment ``.venv-label``; ``make label`` does this)::

    .venv-label/bin/python -m monailabel.main start_server --app custom/label_app --studies data/label_studies \\
        --conf models mammo_gcdm --host 127.0.0.1 --port 8000

App options (``--conf <key> <value>``; paths relative to the repository root):

====================  ==============================================================================================
``models``            ``mammo_gcdm`` (the one model; ``all`` means the same)
``product_python``    the product environment's interpreter (default ``.venv/bin/python``): the synthesis runs there,
                      as ``python -m monai.bundle run inference`` (this app never imports the product code)
``inference_config``  comma-separated bundle config files (default ``bundle/configs/inference.json``; more files
                      override it, e.g. a smaller model's settings)
``ckpt_dir``          trained model folder (default ``bundle/models``: model.pt, autoencoder.pt,
                      feature_normalisation.json)
``presets``           lesion presets (default ``<ckpt_dir>/lesion_presets.json`` with its ``.csv`` beside it)
``default_preset``    preset used when a request names none (default ``typical``)
``feature_library``   feature file for "copy the features of case X" (default ``data/prepared/features.csv``)
``timeout``           seconds one synthesis may take (default 900)
``extensions``        datastore image patterns (default ``*.dcm,*.dicom,*.png``: DICOM mammograms, 16-bit PNG)
``queue_size``        syntheses that may wait while one runs (default 4); more get HTTP 429 "busy"
``worker``            ``true`` (default): a long-lived product-side worker (``custom/serving/worker.py``) keeps the
                      model loaded between requests; ``false``: one product CLI process per request
``worker_threads``    torch CPU threads of the worker (default 0: the inference config's ``num_threads``, 1 on CPU)
====================  ==============================================================================================

The server must be started with this app's request guard, ``--uvicorn_app custom.label_app.asgi:app`` (from the
repository root): it keeps requests inside the datastore, refuses unauthenticated access on non-loopback addresses
and runs syntheses off the event loop (see ``asgi.py`` and ``lib/guard.py``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict

from fastapi import HTTPException

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy

from lib.guard import GuardedLocalDatastore, SynthesisQueue, check_image_id, inside
from lib.dicomweb import make_dicomweb_datastore
from lib.features import FeatureError, FeatureLibrary, PresetLibrary
from lib.infer_synthesis import LABELS, SynthesisTask
from lib.product import ProductSettings
from lib.worker_client import WorkerClient
from lib.strategies import LatestSynthetic, OriginalImage

logger = logging.getLogger(__name__)

MODEL_NAME = "mammo_gcdm"
DEFAULT_EXTENSIONS = "*.dcm,*.dicom,*.png"


def _bundle_version(repo: Path) -> str:
    try:
        return str(json.loads((repo / "bundle" / "configs" / "metadata.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return "0"


class MammoGCDMApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        conf = dict(conf or {})
        if "custom.label_app.asgi" not in sys.modules:
            raise RuntimeError("start the server with this app's request guard: --uvicorn_app custom.label_app.asgi:app "
                               "(from the repository root; `make label` does)")
        self.repo = Path(conf.get("repo") or Path(app_dir).resolve().parents[1]).resolve()

        def path(key: str, default: str | Path) -> Path:
            value = Path(conf.get(key) or default)
            return value if value.is_absolute() else (self.repo / value)

        ckpt_dir = path("ckpt_dir", "bundle/models")
        configs = [c.strip() for c in str(conf.get("inference_config") or "bundle/configs/inference.json").split(",")
                   if c.strip()]
        self.product = ProductSettings(
            repo=self.repo,
            python=path("product_python", ".venv/bin/python"),
            config_files=[str(c if Path(c).is_absolute() else Path(c)) for c in configs],
            ckpt_dir=ckpt_dir,
            timeout=float(conf.get("timeout") or 900),
        )
        self.default_preset = conf.get("default_preset") or "typical"
        self.presets, self.presets_error = None, None
        presets_path = path("presets", ckpt_dir / "lesion_presets.json")
        try:
            self.presets = PresetLibrary(presets_path)
        except (OSError, ValueError, FeatureError) as err:
            self.presets_error = (f"no lesion presets ({presets_path}: {err}); build them with "
                                  "`python -m custom.features.presets --prepared_dir data/prepared --output_dir "
                                  "bundle/models`")
            logger.warning(self.presets_error)
        self.library = FeatureLibrary(path("feature_library", "data/prepared/features.csv"))
        self.extensions = [e.strip() for e in str(conf.get("extensions") or DEFAULT_EXTENSIONS).split(",") if e.strip()]
        models = str(conf.get("models") or MODEL_NAME)
        wanted = [m.strip() for m in models.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in (MODEL_NAME, "all")]
        if unknown:
            raise ValueError(f"unknown model(s) {', '.join(unknown)}; this app serves: {MODEL_NAME}")
        try:
            self.queue = SynthesisQueue(size=int(conf.get("queue_size") or 4))
        except ValueError as err:
            raise ValueError(f"--conf queue_size: {err}") from None
        self.worker = None
        use_worker = str(conf.get("worker", "true")).strip().lower()
        if use_worker not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ValueError(f"--conf worker: expected true or false, got {conf.get('worker')!r}")
        if use_worker in ("true", "1", "yes", "on"):
            try:
                threads = int(conf.get("worker_threads") or 0)
            except ValueError:
                raise ValueError(f"--conf worker_threads: not an integer: {conf.get('worker_threads')!r}") from None
            self.worker = WorkerClient(self.product, num_threads=threads)
            threading.Thread(target=self.worker.start, name="product-worker-start", daemon=True).start()
        if not self.product.python.is_file():
            logger.warning("product interpreter %s not found: run `make env` (or set --conf product_python)",
                           self.product.python)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="mammo_gcdm",
            description="Synthetic mammograms with controllable lesions (GCDM latent diffusion): draw a lesion, "
                        "choose a lesion kind, get a synthetic mammogram saved beside the original",
            version=_bundle_version(self.repo),
            labels=dict(LABELS),
        )

    # -------------------------------------------------------------------------------------------- components
    def init_datastore(self) -> Datastore:
        if self.studies.startswith("http://") or self.studies.startswith("https://"):
            logger.info("Init DICOMweb datastore %s (no dcmqi download: see lib/dicomweb.py)", self.studies)
            return make_dicomweb_datastore(self.studies)
        logger.info("Init datastore for %s with %s", self.studies, self.extensions)
        return GuardedLocalDatastore(
            self.studies,
            extensions=self.extensions,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        return {
            MODEL_NAME: SynthesisTask(self.product, self.presets, self.library, self.datastore,
                                      default_preset=self.default_preset, presets_error=self.presets_error,
                                      worker=self.worker)
        }

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"original": OriginalImage(), "latest_synthetic": LatestSynthetic()}

    def init_trainers(self):
        return {}  # the model is trained by the bundle (make train), not from the MONAI Label client

    def init_scoring_methods(self):
        return {}

    # -------------------------------------------------------------------------------------------- requests
    def infer(self, request, datastore=None):
        """The synthesis request: the image id must name an image of the datastore (its file inside the datastore
        folder), the drawing must be the uploaded label file; then the request waits for its turn in the queue."""
        request = dict(request)
        if request.get("model") == MODEL_NAME:
            ds = datastore if datastore else self.datastore()
            image = check_image_id(request.get("image"))
            request["image_id"] = image
            request["image"] = self.resolve_image(ds, image)
            label = request.get("label")
            if label is not None and not (isinstance(label, str) and os.path.isfile(label)
                                          and inside(label, tempfile.gettempdir())):
                raise HTTPException(status_code=400, detail="label: send the drawing as the uploaded multipart "
                                                            "'label' file")
            request["save_label"] = False  # the result is a new image, never a label of the source
            with self.queue.slot():
                return super().infer(request, datastore)
        return super().infer(request, datastore)

    @staticmethod
    def resolve_image(ds: Datastore, image_id: str) -> str:
        """The local file of a datastore image (HTTP 404 for an id the datastore does not hold)."""
        if image_id not in ds.list_images():
            try:
                n = len(ds.list_images())
            except Exception:
                n = "?"
            raise HTTPException(status_code=404, detail=f"image {image_id!r} not found in the datastore "
                                                        f"({n} images; see GET /datastore/?output=all)")
        if isinstance(ds, GuardedLocalDatastore):
            return ds.resolve_image(image_id)
        return ds.get_image_uri(image_id)

    def info(self) -> Dict[str, Any]:
        meta = super().info()
        meta["product"] = {"python": str(self.product.python), "config_files": self.product.config_files,
                           "ckpt_dir": str(self.product.ckpt_dir)}
        meta["queue"] = self.queue.status()
        meta["product"]["worker"] = dict(self.worker.info) if self.worker is not None else None
        return meta
