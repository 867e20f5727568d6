"""The ``mammo_gcdm`` infer task: a drawn lesion (label or box) + a lesion kind -> a synthetic mammogram.

Request (MONAI Label ``POST /infer/mammo_gcdm?image=<id>``; multipart ``label`` = the drawing, ``params`` = JSON):

==================  ================================================================================================
``label``           uploaded file (NIfTI / NRRD / PNG on the image grid): segments ``lesion`` (+ optional
                    ``breast``), or values 1 = breast / 2 = lesion, or a binary lesion mask (see ``labels.py``)
``lesion_box``      instead of a drawn lesion: ``"x0,y0,x1,y1"`` (pixels, x = column) or a list of boxes; the lesion
                    is the ellipse inscribed in the box. The 3D Slicer module's ROI (``roi``) is used the same way.
``preset``          lesion kind from ``lesion_presets.json`` (default: ``--conf default_preset``, ``typical``)
``features``        instead of a preset: a case id of the feature library, ``"<case id>:<lesion index>"``, or
                    ``{feature name: value}`` (67 PyRadiomics names; JSON text accepted)
``mode``            ``keep`` (default): the same mammogram, new content only in the (dilated) lesion region;
                    ``whole``: a whole new image following the drawn breast (or the source's breast) + lesion
``seed``            integer; ``random`` / empty: a random one (returned in the response)
``guidance_scale``  classifier-free guidance scale (default: the bundle's, 3.0)
``steps``           DDIM steps (default: the bundle's, 50)
``result``          ``auto`` (default): the image for API clients, JSON only for the 3D Slicer Scribbles panel
                    (which would load an image result as a segmentation); ``image``; ``json``
``format``          format of the returned image: ``nii`` (default, ``.nii.gz``), ``dcm`` or ``png``
``attributes``      clinical attributes, ``"view=MLO,density=D,area=small"`` or ``{"view": "MLO", ...}`` (a model
                    trained with ``attribute_names``; see ``custom/data/attributes.py``)
``prompt``          a MAM-E-style prompt, ``"a siemens mammogram in MLO view with high density"``
``lesion_labels``   per-lesion labels, ``"birads=5,category=mass; birads=3"`` or ``[{"birads": 5}, ...]`` (a model
                    trained with ``lesion_label_names``; see ``custom/data/lesion_labels.py``)
==================  ================================================================================================

``attributes`` / ``prompt`` / ``lesion_labels`` are checked here for their form only (text of letters, digits, spaces
and ``= , - _ .``, ``;`` between lesions,
at most 300 characters: nothing in them can reach the product's configuration as an expression); their names,
values and words are checked by the product's own parser (``custom.data.attributes``), whose one-line error comes
back as a 400 before any sampling.

Every synthesis is saved into the datastore as a new image ``<id>_synthetic_<preset>_s<seed>`` (``..._synthetic_whole_...``
for whole-image mode; a ``_2``, ``_3`` ... suffix when the name exists), a DICOM with the product's SYNTHETIC
markings; its datastore info holds ``synthetic: true``, the source image, the request and the product's sidecar.

Errors are HTTP errors whose ``detail`` is one readable sentence: 404 unknown image, 400 bad request data (the
product's own one-line input error passed through), 504 timeout, 500 anything else.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Tuple, Union

import numpy as np
from fastapi import HTTPException

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.features import FeatureError, FeatureLibrary, PresetLibrary, request_features
from lib.labels import Drawing, LabelError, count_lesions, parse_boxes, read_label, roi_to_box, safe_name, split_label, write_png
from lib.product import ProductError, ProductSettings, run_product
from lib.worker_client import WorkerClient

logger = logging.getLogger(__name__)

__all__ = ["SynthesisTask", "LABELS", "MODES"]

LABELS = {"breast": 1, "lesion": 2}
MODES = {"keep": "keep", "whole": "generate", "generate": "generate"}
FORMATS = {"nii": ".nii.gz", "dcm": ".dcm", "png": ".png"}
MAX_SEED = 2**32 - 1
#: DDIM steps cannot exceed the diffusion schedule's 1000 training steps
MAX_STEPS = 1000
#: classifier-free guidance scales beyond this only saturate the image
MAX_GUIDANCE = 100.0
_BREAST_SCRIPT = Path(__file__).resolve().parent / "breast_mask.py"


def _http(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def _opt_float(request: dict, key: str, default: Any = None, low: float = -math.inf,
               high: float = math.inf) -> float | None:
    value = request.get(key, default)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise _http(400, f"{key} must be a number, got {_short(value)}") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise _http(400, f"{key} must be a finite number in [{low:g}, {high:g}], got {_short(value)}")
    return number


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _seed(value: Any) -> int:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "random", "none")):
        return secrets.randbelow(1_000_000)
    if isinstance(value, bool):
        raise _http(400, f"seed must be an integer or 'random', got {value!r}")
    try:
        number = float(value)
        seed = int(number)
    except (TypeError, ValueError, OverflowError):
        raise _http(400, f"seed must be an integer or 'random', got {_short(value)}") from None
    if seed != number or not 0 <= seed <= MAX_SEED:
        raise _http(400, f"seed must be an integer in [0, {MAX_SEED}], got {_short(value)}")
    return seed


_ATTRIBUTE_TEXT = re.compile(r"[A-Za-z0-9 =,._-]*")
_LESION_LABEL_TEXT = re.compile(r"[A-Za-z0-9 =,._;-]*")
MAX_ATTRIBUTE_TEXT = 300


def _attribute_text(request: dict, key: str) -> str | None:
    """``attributes`` (text or a JSON object name -> value) / ``prompt`` (text) of a request as one plain text for the
    product, or ``None`` when absent; anything else is a 400 naming the parameter."""
    value = request.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None

    def pairs(obj: dict) -> str:
        parts = []
        for name, v in obj.items():
            if not isinstance(v, (str, int)) or isinstance(v, bool) or any(c in f"{name}{v}" for c in ",=;"):
                raise _http(400, f"{key}: each value must be a plain word or number, got {name}={_short(v)}")
            parts.append(f"{name}={v}")
        return ",".join(parts)

    if key == "attributes" and isinstance(value, dict):
        value = pairs(value)
    elif key == "lesion_labels" and isinstance(value, list):
        if not all(isinstance(v, dict) for v in value):
            raise _http(400, f"lesion_labels: a list must hold one object per lesion, got {_short(value)}")
        value = "; ".join(pairs(v) for v in value)
    if not isinstance(value, str):
        what = {"attributes": "text such as 'view=MLO,density=D' or an object {name: value}",
                "lesion_labels": "text such as 'birads=5,category=mass; birads=3' or a list of objects"}.get(key, "text")
        raise _http(400, f"{key} must be {what}, got {_short(value)}")
    text = " ".join(value.split())
    pattern = _LESION_LABEL_TEXT if key == "lesion_labels" else _ATTRIBUTE_TEXT
    if len(text) > MAX_ATTRIBUTE_TEXT or not pattern.fullmatch(text):
        extra = " ;" if key == "lesion_labels" else ""
        raise _http(400, f"{key}: at most {MAX_ATTRIBUTE_TEXT} characters of letters, digits, spaces and = , - _ .{extra} "
                         f"are accepted, got {_short(value)}")
    return text


def _choice(request: dict, key: str, allowed, default: str) -> str:
    value = request.get(key)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    value = default if value is None or str(value).strip() == "" else str(value).strip().lower()
    if value not in allowed:
        raise _http(400, f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    return value


class SynthesisTask(InferTask):
    """See the module docstring. ``datastore`` is a callable returning the app's datastore (new images go there)."""

    def __init__(self, product: ProductSettings, presets: PresetLibrary | None, library: FeatureLibrary,
                 datastore: Callable[[], Any], default_preset: str | None = "typical",
                 description: str = "GCDM: synthesise a lesion where you drew it (keep mode) or a whole new mammogram "
                                    "(whole mode), with the chosen lesion kind",
                 presets_error: str | None = None, worker: WorkerClient | None = None):
        self.product = product
        self.worker = worker
        self.presets = presets
        self.presets_error = presets_error
        self.library = library
        self._datastore = datastore
        self.default_preset = default_preset
        config = {
            "preset": presets.ordered(default_preset) if presets else [],
            "mode": ["keep", "whole"],
            "features": "",
            "lesion_box": "",
            "seed": "random",
            "guidance_scale": "",
            "steps": "",
            "result": ["auto", "image", "json"],
            "format": ["nii", "dcm", "png"],
            "attributes": "",
            "prompt": "",
            "lesion_labels": "",
        }
        super().__init__(type=InferType.SCRIBBLES, labels=dict(LABELS), dimension=2, description=description,
                         config=config)

    # ------------------------------------------------------------------------------------------------ info
    def info(self) -> Dict[str, Any]:
        out = super().info()
        out["presets"] = self.presets.summary() if self.presets else {}
        if self.presets_error:
            out["presets_error"] = self.presets_error
        out["modes"] = {"keep": "the same mammogram; new content only in the lesion region (dilated)",
                        "whole": "a whole new mammogram following the drawn breast + lesion masks"}
        out["model_files"] = {name: (self.product.ckpt_dir / name).is_file()
                              for name in ("model.pt", "autoencoder.pt", "feature_normalisation.json")}
        out["synthetic_images"] = "saved into the datastore as <image>_synthetic_<preset>_s<seed>"
        return out

    def is_valid(self) -> bool:
        return self.product.python.is_file()

    # ------------------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _source_image(path: str, image_id: str) -> Path:
        if not path:
            raise _http(404, f"image {image_id!r} not found in the datastore")
        p = Path(path)
        if p.is_dir():  # a DICOMweb series folder: one mammogram = one instance
            files = [f for f in sorted(p.iterdir()) if f.is_file()]
            if len(files) != 1:
                raise _http(400, f"image {image_id!r} is a series of {len(files)} files; a mammogram must be one "
                                 "DICOM instance")
            p = files[0]
        if not p.is_file():
            raise _http(404, f"image {image_id!r} not found (no file at its datastore location)")
        name = p.name.lower()
        if name.endswith((".nii", ".nii.gz", ".nrrd")):
            raise _http(400, f"image {image_id!r} is a {p.suffix} volume; the synthesis needs the DICOM (or PNG) "
                             "mammogram (for DICOMweb set MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI=false)")
        return p

    def _new_id(self, base: str) -> str:
        ds = self._datastore()
        try:
            existing = set(ds.list_images())
        except Exception:  # a datastore that cannot list
            existing = set()
        name, k = base, 2
        while name in existing:
            name, k = f"{base}_{k}", k + 1
        return name

    def _drawing(self, request: dict) -> tuple[Drawing | None, list[list[float]] | None]:
        drawing = None
        label = request.get("label")
        if isinstance(label, str) and label and os.path.isfile(label):
            try:
                drawing = split_label(read_label(label), request.get("label_info"))
            except LabelError as err:
                raise _http(400, str(err)) from None
        try:
            boxes = parse_boxes(request.get("lesion_box"))
        except LabelError as err:
            raise _http(400, str(err)) from None
        if boxes is None:
            roi = roi_to_box(request.get("roi"))
            boxes = [roi] if roi else None
        has_lesion = drawing is not None and bool(drawing.lesion.any())
        if has_lesion and boxes:
            raise _http(400, "give the lesion either as a drawn label or as a box, not both")
        if not has_lesion and not boxes:
            what = "the label is empty" if drawing is not None else "no label was sent"
            raise _http(400, f"no lesion to synthesise: {what}; draw the lesion (segment 'lesion', or value 2) or give "
                             "lesion_box x0,y0,x1,y1")
        return drawing, boxes

    def _store(self, new_id: str, dcm: Path, info: dict) -> str:
        ds = self._datastore()
        if hasattr(ds, "series_attributes"):  # the DICOMweb datastore: STOW-RS, the id is the new series UID
            series = ds.add_image(new_id, str(dcm), info)
            info["dicomweb_series"] = series
            return series
        return ds.add_image(new_id, str(dcm), info)

    def _run(self, op: str, args: dict, replacements) -> None:
        """One product call: through the long-lived worker when the app has one, else the product's CLI."""
        if self.worker is None:
            if op == "breast_mask":
                run_product(self.product, args, replacements, script=[str(_BREAST_SCRIPT)])
            else:
                self._run("infer", args, replacements)
            return
        try:
            self.worker.call(op, args)
        except ProductError as err:
            for old, new in replacements:
                err.message = err.message.replace(old, new)
            raise

    # ------------------------------------------------------------------------------------------------ run
    def __call__(self, request) -> Tuple[Union[str, None], Dict]:
        start = time.time()
        image_id = request.get("image_id")  # set by the app after resolving the id inside the datastore
        if not image_id:
            raise _http(400, "image: a datastore image id is required")
        image_id = str(image_id)
        source = self._source_image(str(request.get("image") or ""), image_id)
        image_id = safe_name(image_id, 96)
        mode = _choice(request, "mode", ("keep", "whole", "generate"), "keep")
        result = _choice(request, "result", ("auto", "image", "json"), "auto")
        if result == "auto":
            result = "json" if request.get("label_info") is not None else "image"
        fmt = _choice(request, "format", tuple(FORMATS), "nii")
        seed = _seed(request.get("seed"))
        guidance = _opt_float(request, "guidance_scale", low=0.0, high=MAX_GUIDANCE)
        steps = _opt_float(request, "steps", low=1, high=MAX_STEPS)
        if steps is not None and steps != int(steps):
            raise _http(400, f"steps must be an integer in [1, {MAX_STEPS}], got {_short(request.get('steps'))}")
        attributes = _attribute_text(request, "attributes")
        prompt = _attribute_text(request, "prompt")
        lesion_labels = _attribute_text(request, "lesion_labels")

        drawing, boxes = self._drawing(request)
        n_lesions = len(boxes) if boxes else count_lesions(drawing.lesion)

        tmp = Path(tempfile.mkdtemp(prefix="mammo_label_"))
        try:
            try:
                feature_file, feature_src = request_features(
                    request.get("preset"), request.get("features"), n_lesions, tmp, self.presets, self.library,
                    self.default_preset)
            except FeatureError as err:
                raise _http(400, str(err)) from None
            except OSError as err:
                raise _http(500, f"cannot read the lesion features: {err}") from None

            args: dict[str, Any] = {"mode": MODES[mode], "feature_file": str(feature_file),
                                    "attributes": attributes, "prompt": prompt, "lesion_labels": lesion_labels}
            replacements = [(str(tmp) + os.sep, ""), ("drawn_label.png", "the drawn label"),
                            ("drawn_lesion.png", "the drawn lesion"), ("drawn_breast.png", "the drawn breast"),
                            ("auto_breast.png", "the breast found in the image"),
                            (feature_file.name, "the requested lesion features"), (str(source), image_id)]
            breast = drawing.breast if drawing is not None else None
            if breast is not None and drawing is not None and drawing.lesion.any():
                label_map = np.zeros(drawing.shape, dtype=np.uint8)
                label_map[breast] = 1
                label_map[drawing.lesion] = 2
                args["mask_file"] = str(write_png(tmp / "drawn_label.png", label_map))
            else:
                if breast is not None:
                    args["breast_mask_file"] = str(write_png(tmp / "drawn_breast.png", breast.astype(np.uint8) * 255))
                elif mode != "keep":  # whole image without a drawn breast: the breast of the source image
                    auto = tmp / "auto_breast.png"
                    self._run("breast_mask", {"image_file": str(source), "output": str(auto)}, replacements)
                    args["breast_mask_file"] = str(auto)
                if boxes:
                    args["lesion_box"] = boxes[0] if len(boxes) == 1 else boxes
                else:
                    args["lesion_mask_file"] = str(write_png(tmp / "drawn_lesion.png",
                                                             drawing.lesion.astype(np.uint8) * 255))
            if mode == "keep":
                args["image_file"] = str(source)
            else:
                args["source_image"] = str(source)

            tag = safe_name(feature_src.get("tag", "custom"), 40)
            new_id = self._new_id(f"{image_id}_synthetic_{'whole_' if mode != 'keep' else ''}{tag}_s{seed}")
            out_dir = tmp / "out"
            args.update({"output_dir": str(out_dir), "case_id": new_id, "seed": seed, "num_samples": 1,
                         "guidance_scale": guidance, "ddim_steps": None if steps is None else int(steps),
                         "progress": False})
            self._run("infer", args, replacements)

            stem = out_dir / f"{new_id}_seed{seed}"
            files = {k: Path(str(stem) + s) for k, s in FORMATS.items()}
            sidecar_path = Path(str(stem) + ".json")
            if not files["dcm"].is_file():
                raise _http(500, f"the synthesis wrote no image (expected {files['dcm'].name})")
            sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else {}
            request_record = {k: v for k, v in feature_src.items() if k != "tag"}
            info = {
                "synthetic": True,
                "source_image": image_id,
                "mode": mode,
                "seed": seed,
                "guidance_scale": guidance,
                "steps": None if steps is None else int(steps),
                "features": request_record,
                "attributes": attributes,
                "prompt": prompt,
                "lesion_labels": lesion_labels,
                "lesion": ({"boxes": boxes} if boxes else {"drawn_pixels": int(drawing.lesion.sum()),
                                                            "label_rule": drawing.how}),
                "breast": "drawn" if breast is not None else "found in the source image",
                "sidecar": sidecar,
            }
            stored_id = self._store(new_id, files["dcm"], dict(info))
            seconds = round(time.time() - start, 2)
            response = {
                "image_id": stored_id,
                "source_image": image_id,
                "mode": mode,
                "seed": seed,
                "features": request_record,
                "n_lesions": n_lesions,
                "seconds": seconds,
                "message": f"synthetic image saved in the datastore as {stored_id}",
                "sidecar": sidecar,
            }
            logger.info("mammo_gcdm: %s -> %s in %.1f s", image_id, stored_id, seconds)
            if result == "json":
                return None, response
            chosen = files[fmt]
            if not chosen.is_file():
                raise _http(500, f"the synthesis wrote no {fmt} image")
            fd, out_file = tempfile.mkstemp(suffix=FORMATS[fmt], prefix=f"{stored_id}_")
            os.close(fd)
            shutil.copyfile(chosen, out_file)  # the endpoint deletes the returned file after sending it
            response["file_format"] = fmt
            return out_file, response
        except ProductError as err:
            if err.kind == "input":
                raise _http(400, err.message) from None
            logger.error("mammo_gcdm: product failure: %s\n%s", err.message, err.log)
            raise _http(504 if err.kind == "timeout" else 500, err.message) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
