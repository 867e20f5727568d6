"""ASGI entry of the mammo_gcdm MONAI Label server: MONAI Label's own FastAPI app with this app's request guard.

Start the server with MONAI Label's ``--uvicorn_app`` option, from the repository root (``make label`` does)::

    .venv-label/bin/python -m monailabel.main start_server --app custom/label_app --studies data/label_studies \\
        --uvicorn_app custom.label_app.asgi:app --host 127.0.0.1 --port 8000 ...

The app refuses to start without it. What the guard changes (everything else is MONAI Label's stock server):

1. **Who may connect.** A request reaching the server on a non-loopback address is answered 403 unless MONAI
   Label's authentication is on (``MONAI_LABEL_AUTH_ENABLE=true`` with ``MONAI_LABEL_AUTH_REALM_URI`` of a Keycloak
   realm; MONAI Label then checks the bearer token of every request).
2. **Synthesis off the event loop.** MONAI Label's endpoints are ``async`` functions doing blocking work, so one
   synthesis stalled every request. ``POST /infer/{model}`` is replaced by a plain function (FastAPI runs it in its
   thread pool) that checks the request first: a known model (404), a datastore image id (400/404), ``params`` a
   JSON object (400) that does not set ``image`` / ``label`` / ``file`` / ``session_id`` (the drawing is the
   uploaded ``label`` file, never a server path), no image upload or session (400), no ``dicom_seg`` output (400).
   The app queues syntheses (``--conf queue_size``; 429 "busy" when full).
3. **4xx for malformed requests.** Bad JSON anywhere (400), MONAI Label's "invalid input" and "not found" exceptions
   (400 / 404) instead of 500; requests for features this app does not have answer 404 with the reason (training,
   scoring and batch tasks, whole-slide inference, sessions, unknown strategies, the DICOMweb proxy without a DICOMweb
   datastore, GPU info without a GPU), and model files cannot be replaced or deleted over HTTP (403).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Optional

APP_DIR = Path(__file__).resolve().parent
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))

from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, Request, UploadFile  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from fastapi.routing import APIRoute  # noqa: E402

from monailabel.app import app as monailabel_app  # noqa: E402
from monailabel.config import settings  # noqa: E402
from monailabel.endpoints import infer as infer_endpoint  # noqa: E402
from monailabel.endpoints.user.auth import RBAC, User  # noqa: E402
from monailabel.interfaces.exception import (  # noqa: E402
    ImageNotFoundException,
    LabelNotFoundException,
    MONAILabelError,
    MONAILabelException,
)
from monailabel.interfaces.utils.app import app_instance  # noqa: E402

from lib.guard import auth_enabled, check_image_id, is_loopback  # noqa: E402

__all__ = ["app", "GUARD_INSTALLED"]

#: read by the app at start: it refuses to serve without this guard
GUARD_INSTALLED = True
RESERVED_PARAMS = ("image", "label", "file", "model", "session", "session_id", "save_label", "label_tag")


def _bad(status: int, detail: str) -> HTTPException:
    return HTTPException(status_code=status, detail=detail)


# ------------------------------------------------------------------------------------------------ POST /infer/{model}
def guarded_infer(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: Optional[infer_endpoint.ResultType] = None,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
):
    instance = app_instance()
    models = instance.info().get("models", {})
    if model not in models:
        raise _bad(404, f"unknown model {model!r}; this server has: {', '.join(models) or 'none'}")
    if file is not None or session_id:
        raise _bad(400, "upload the mammogram into the datastore first (PUT /datastore/image): this app synthesises "
                        "from datastore images only (no image upload, no session)")
    check_image_id(image)
    try:
        p = json.loads(params) if params else {}
    except ValueError as err:
        raise _bad(400, f"params: not valid JSON ({err})") from None
    if not isinstance(p, dict):
        raise _bad(400, f"params must be a JSON object, got {type(p).__name__}")
    reserved = [k for k in RESERVED_PARAMS if k in p]
    if reserved:
        raise _bad(400, f"params may not set {', '.join(reserved)}: the image is the 'image' query parameter (a "
                        "datastore id) and the drawing the uploaded multipart 'label' file")
    if output == infer_endpoint.ResultType.dicom_seg:
        raise _bad(400, "output=dicom_seg is not available: the result is a new image (use image, json or all)")
    return infer_endpoint.run_inference(background_tasks, model, image, "", params, None, label, output)


def _install_infer_route(fastapi_app) -> None:
    path = settings.MONAI_LABEL_API_STR + "/infer/{model}"
    fastapi_app.add_api_route(path, guarded_infer, methods=["POST"],
                              summary="Run the synthesis (mammo_gcdm request guard; see custom/label_app/asgi.py)")
    routes = fastapi_app.router.routes
    ours = routes.pop()
    assert isinstance(ours, APIRoute) and ours.endpoint is guarded_infer
    routes.insert(0, ours)  # the first full match wins: ours before MONAI Label's included infer router


# ------------------------------------------------------------------------------------------------ exceptions
def _install_exception_handlers(fastapi_app) -> None:
    async def json_error(request: Request, exc: json.JSONDecodeError):
        return JSONResponse(status_code=400, content={"detail": f"not valid JSON ({exc})"})

    async def not_found(request: Request, exc: MONAILabelException):
        return JSONResponse(status_code=404, content={"detail": str(exc.msg)})

    async def monailabel_error(request: Request, exc: MONAILabelException):
        status = 400 if exc.error == MONAILabelError.INVALID_INPUT else 500
        return JSONResponse(status_code=status, content={"detail": str(exc.msg)})

    fastapi_app.add_exception_handler(json.JSONDecodeError, json_error)
    fastapi_app.add_exception_handler(ImageNotFoundException, not_found)
    fastapi_app.add_exception_handler(LabelNotFoundException, not_found)
    fastapi_app.add_exception_handler(MONAILabelException, monailabel_error)


# ------------------------------------------------------------------------------------------------ refusals
def refusal(method: str, path: str) -> tuple[int, str] | None:
    """``(status, reason)`` for requests this app does not serve (before MONAI Label sees them), else None."""
    api = settings.MONAI_LABEL_API_STR
    if api and path.startswith(api):
        path = path[len(api):]
    parts = [p for p in path.split("/") if p]
    if not parts:
        return None
    head = parts[0]
    if head == "model" and method in ("PUT", "POST", "DELETE"):
        return 403, "model files are managed by the bundle (make train); the server does not replace or delete them"
    if head in ("train", "scoring") and method in ("POST", "PUT"):
        return 404, (f"this app has no {'training' if head == 'train' else 'scoring'} tasks (the model is trained "
                     "by the bundle: make train)")
    if head == "batch" and method in ("POST", "PUT"):
        return 404, "batch inference is not available: each synthesis needs a drawn lesion (POST /infer/mammo_gcdm)"
    if head == "infer" and len(parts) > 1 and parts[1] in ("wsi", "wsi_v2"):
        return 404, "whole-slide inference is not available in this app"
    if head == "activelearning" and method == "POST" and len(parts) == 2:
        try:
            strategies = app_instance().info().get("strategies", {})
        except Exception:  # the app is still starting
            return None
        if parts[1] not in strategies:
            return 404, f"unknown strategy {parts[1]!r}; this server has: {', '.join(strategies)}"
    if head == "session" and method in ("PUT", "POST"):
        return 404, "sessions are not used by this app: open a datastore image (GET /datastore/?output=all)"
    if head == "logs" and len(parts) > 1 and parts[1] == "gpu" and shutil.which("nvidia-smi") is None:
        return 404, "no GPU information on this server (nvidia-smi not found)"
    if head == "proxy":
        try:
            dicomweb = type(app_instance().datastore()).__name__.endswith("DICOMWebDatastore")
        except Exception:
            return None
        if not dicomweb:
            return 404, "no DICOMweb datastore behind this server (the DICOMweb proxy serves only one)"
    return None


class Guard:
    """Pure ASGI middleware in front of MONAI Label: the access rule, then :func:`refusal`."""

    def __init__(self, app):
        self.inner = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            server = scope.get("server") or ("", 0)
            if not is_loopback(server[0]) and not auth_enabled():
                return await self._answer(send, 403, f"this server is reachable on {server[0]} without "
                                                     "authentication: enable MONAI Label's authentication "
                                                     "(MONAI_LABEL_AUTH_ENABLE=true with MONAI_LABEL_AUTH_REALM_URI) "
                                                     "or bind it to 127.0.0.1")
            refused = refusal(scope.get("method", "GET"), scope.get("path", ""))
            if refused:
                return await self._answer(send, *refused)
        return await self.inner(scope, receive, send)

    @staticmethod
    async def _answer(send, status: int, detail: str):
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


_install_infer_route(monailabel_app)
_install_exception_handlers(monailabel_app)
monailabel_app.add_middleware(Guard)
app = monailabel_app
