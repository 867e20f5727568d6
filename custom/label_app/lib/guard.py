"""What the MONAI Label server of this app accepts: datastore ids and label tags, who may connect, how many syntheses.

MONAI Label 0.8.5 resolves ids and tags by joining them to the datastore folder (``PUT /datastore/label?tag=../x``
writes outside it), reads any server file named as the inference ``image`` or as the ``label`` parameter, binds to
every interface by default without authentication, and runs its endpoints on the event loop (one synthesis blocks
every request). The pieces here close those doors; ``asgi.py`` puts them in front of MONAI Label's FastAPI app:

- :func:`check_image_id` / :func:`check_tag`: ids and tags are single file-name tokens (letters, digits, ``._-``,
  no leading dot, at most 128 / 64 characters), refused with HTTP 400 otherwise, before any file is touched;
- :class:`GuardedLocalDatastore` (and the DICOMweb one in ``dicomweb.py``): every id/tag entry point of the
  datastore checks them, and unknown ids are HTTP 404;
- :func:`inside` : a resolved path must lie inside the datastore folder (symbolic links resolved);
- :func:`is_loopback` + :func:`auth_enabled`: a server reached on a non-loopback address answers only when
  MONAI Label's own authentication (``MONAI_LABEL_AUTH_ENABLE=true`` with its Keycloak realm) is on;
- :class:`SynthesisQueue`: one synthesis at a time, at most ``size`` waiting, HTTP 429 "busy" beyond that.
"""

from __future__ import annotations

import ipaddress
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator

from fastapi import HTTPException

from monailabel.datastore.local import LocalDatastore

__all__ = ["check_image_id", "check_tag", "inside", "is_loopback", "auth_enabled", "GuardedLocalDatastore",
           "SynthesisQueue", "BusyError", "ID_PATTERN", "TAG_PATTERN"]

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TAG_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "...'"


def check_image_id(image_id: Any, what: str = "image") -> str:
    """``image_id`` if it is a plain datastore id (no path), else HTTP 400."""
    if not isinstance(image_id, str) or not image_id:
        raise HTTPException(status_code=400, detail=f"{what}: an image id of the datastore is required "
                                                    "(see GET /datastore/?output=all)")
    if not ID_PATTERN.match(image_id) or ".." in image_id:
        raise HTTPException(status_code=400, detail=f"{what} {_shown(image_id)}: not a datastore id (ids are "
                                                    "letters, digits, '.', '_', '-'; paths are not accepted)")
    return image_id


def check_tag(tag: Any) -> str:
    """``tag`` if it is a plain label tag (letters, digits, ``_``, ``-``), else HTTP 400."""
    if not isinstance(tag, str) or not TAG_PATTERN.match(tag):
        raise HTTPException(status_code=400, detail=f"tag {_shown(tag)}: a label tag is letters, digits, '_' and '-' "
                                                    "(at most 64; e.g. 'final', 'original')")
    return tag


def inside(path: str | Path, root: str | Path) -> bool:
    """Whether ``path`` (symbolic links resolved) is ``root`` or lies below it."""
    try:
        real, base = os.path.realpath(path), os.path.realpath(root)
    except (OSError, ValueError):
        return False
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def is_loopback(host: Any) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address."""
    if not host:
        return False
    host = str(host).strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_enabled() -> bool:
    from monailabel.config import settings

    return bool(settings.MONAI_LABEL_AUTH_ENABLE)


class GuardedLocalDatastore(LocalDatastore):
    """MONAI Label's local datastore with every id and tag checked (HTTP 400) and unknown ids refused (HTTP 404)
    before the stock implementation joins them to a path."""

    def _known(self, image_id: str) -> str:
        check_image_id(image_id)
        if image_id not in self._datastore.objects:
            raise HTTPException(status_code=404, detail=f"image {image_id!r} not found in the datastore")
        return image_id

    def resolve_image(self, image_id: str) -> str:
        """The file of a datastore image, refused unless it lies inside the datastore folder."""
        self._known(image_id)
        uri = super().get_image_uri(image_id)
        if not uri or not inside(uri, self._datastore_path):
            raise HTTPException(status_code=404, detail=f"image {image_id!r} not found in the datastore")
        return uri

    def get_image_uri(self, image_id: str) -> str:
        check_image_id(image_id)
        uri = super().get_image_uri(image_id)
        return uri if uri and inside(uri, self._datastore_path) else ""

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        check_image_id(image_id)
        return super().get_image_info(image_id)

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        check_image_id(label_id, "label")
        check_tag(label_tag)
        uri = super().get_label_uri(label_id, label_tag)
        return uri if uri and inside(uri, self._datastore_path) else ""

    def get_label_info(self, label_id: str, label_tag: str) -> Dict[str, Any]:
        check_image_id(label_id, "label")
        check_tag(label_tag)
        return super().get_label_info(label_id, label_tag)

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        if image_id:
            check_image_id(image_id)
        else:
            check_image_id(self._to_id(os.path.basename(image_filename))[0], "image file name")
        return super().add_image(image_id, image_filename, image_info)

    def remove_image(self, image_id: str) -> None:
        self._known(image_id)
        return super().remove_image(image_id)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        self._known(image_id)
        check_tag(label_tag)
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        check_image_id(label_id, "label")
        check_tag(label_tag)
        if not self._datastore.label(label_id, label_tag):
            raise HTTPException(status_code=404, detail=f"no label {label_id!r} with tag {label_tag!r}")
        return super().remove_label(label_id, label_tag)

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        self._known(image_id)
        if not isinstance(info, dict):
            raise HTTPException(status_code=400, detail="info must be a JSON object")
        return super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        check_image_id(label_id, "label")
        check_tag(label_tag)
        if not isinstance(info, dict):
            raise HTTPException(status_code=400, detail="info must be a JSON object")
        if not self._datastore.label(label_id, label_tag):
            raise HTTPException(status_code=404, detail=f"no label {label_id!r} with tag {label_tag!r}")
        return super().update_label_info(label_id, label_tag, info)


class BusyError(HTTPException):
    def __init__(self, running: int, waiting: int):
        super().__init__(status_code=429, headers={"Retry-After": "30"},
                         detail=f"busy: {running} synthesis running and {waiting} waiting (the queue is full); "
                                "try again in a minute")


class SynthesisQueue:
    """At most ``workers`` syntheses run at once; at most ``size`` more wait (in arrival order, by a fair lock);
    beyond that :class:`BusyError` (HTTP 429). Other requests never wait here."""

    def __init__(self, size: int = 4, workers: int = 1):
        if size < 0 or workers < 1:
            raise ValueError(f"queue size must be >= 0 and workers >= 1, got {size}, {workers}")
        self.size, self.workers = int(size), int(workers)
        self._slots = threading.Semaphore(self.workers)
        self._lock = threading.Lock()
        self.running = 0
        self.waiting = 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        with self._lock:
            if self.running + self.waiting >= self.workers + self.size:
                raise BusyError(self.running, self.waiting)
            self.waiting += 1
        self._slots.acquire()
        with self._lock:
            self.waiting -= 1
            self.running += 1
        try:
            yield
        finally:
            with self._lock:
                self.running -= 1
            self._slots.release()

    def status(self) -> Dict[str, int]:
        with self._lock:
            return {"running": self.running, "waiting": self.waiting, "queue_size": self.size}
