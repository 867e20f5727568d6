"""A DICOMweb (PACS) datastore for the app, without dcmqi, and synthetic images found by their DICOM attributes.

MONAI Label 0.8.5 needs dcmqi for one thing only: ``itkimage2segimage``, called by
``monailabel.datastore.utils.convert.nifti_to_dicom_seg(use_itk=True)`` when a *final label* is saved to a
DICOMweb datastore as DICOM SEG (``DICOMWebDatastore.save_label``) and by the ``/infer?output=dicom_seg`` answer.
Its start-up code downloads dcmqi from GitHub before the datastore exists (``MONAILabelApp._init_dicomweb_datastore``
calls ``_download_dcmqi_tools``), so an offline server does not start; Debian has no dcmqi package.

This app needs neither path with dcmqi: its results are new images (STOW-RS of the product's DICOM), the app
refuses ``output=dicom_seg`` (``asgi.py``), and :class:`MammoDICOMWebDatastore` saves final labels through the
other writer MONAI Label ships in the same function, pydicom-seg's ``MultiClassWriter``
(``nifti_to_dicom_seg(use_itk=False)``; pydicom-seg is installed with monailabel). The app builds the datastore itself
(:func:`make_dicomweb_datastore`, the stock construction minus the download), so nothing tries to reach GitHub.

Other differences from the stock ``DICOMWebDatastore``: images are kept as DICOM (no NIfTI conversion: the product
reads the mammogram's own DICOM display pipeline), ids are checked as DICOM UIDs before any cache path is built, the
default search filter is ``{"Modality": "MG"}`` (MONAI Label's is CT; another ``MONAI_LABEL_DICOMWEB_SEARCH_FILTER``
is used as given), and :meth:`MammoDICOMWebDatastore.series_attributes` returns the series' description/date/time in one QIDO
query (what ``strategies.py`` uses to tell synthetic from original images).
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
from typing import Any, Dict

from fastapi import HTTPException

from dicomweb_client.session_utils import create_session_from_user_pass

from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.utils.convert import binary_to_image, nifti_to_dicom_seg
from monailabel.datastore.utils.dicom import dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag

from lib.guard import check_tag, inside

logger = logging.getLogger(__name__)

__all__ = ["MammoDICOMWebDatastore", "make_dicomweb_datastore", "search_filter", "check_uid", "UID_PATTERN"]

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
DEFAULT_SEARCH_FILTER = {"Modality": "MG"}
MONAI_LABEL_DEFAULT_FILTER = {"Modality": "CT"}
SERIES_FIELDS = ("SeriesDescription", "SeriesDate", "SeriesTime", "Modality", "StudyInstanceUID")


def check_uid(uid: Any, what: str = "image") -> str:
    if not isinstance(uid, str) or len(uid) > 64 or not UID_PATTERN.match(uid):
        raise HTTPException(status_code=400, detail=f"{what} {str(uid)[:80]!r}: not a DICOM series UID (digits and "
                                                    "dots; see GET /datastore/?output=all)")
    return uid


def search_filter() -> Dict[str, Any]:
    """MONAI Label's ``MONAI_LABEL_DICOMWEB_SEARCH_FILTER``, except that its built-in default ``{"Modality": "CT"}``
    becomes ``{"Modality": "MG"}`` (MONAI Label exports every setting into the environment at start, so a CT filter
    cannot be told apart from the default; this is a mammography app)."""
    value = settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER
    if not isinstance(value, dict):
        raise ValueError("MONAI_LABEL_DICOMWEB_SEARCH_FILTER: must be a JSON object, e.g. {\"Modality\": \"MG\"}")
    if value == MONAI_LABEL_DEFAULT_FILTER:
        return dict(DEFAULT_SEARCH_FILTER)
    return dict(value)


class MammoDICOMWebDatastore(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore with checked ids, DICOM kept as DICOM, and DICOM SEG written without dcmqi."""

    def __init__(self, client, search_filter: Dict[str, Any], cache_path: str | None = None, fetch_by_frame=False):
        super().__init__(client=client, search_filter=search_filter, cache_path=cache_path,
                         fetch_by_frame=fetch_by_frame, convert_to_nifti=False)

    def get_image_uri(self, image_id: str) -> str:
        """The local folder of the series (downloaded once with WADO-RS in its stored transfer syntax)."""
        check_uid(image_id)
        image_dir = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
        if not inside(image_dir, self._datastore.image_path()):
            raise HTTPException(status_code=404, detail=f"image {image_id!r} not found in the datastore")
        if not os.path.isdir(image_dir) or not os.listdir(image_dir):
            self._download(image_id, image_dir)
        return image_dir

    def _download(self, series_uid: str, image_dir: str) -> None:
        """WADO-RS retrieve of a series, asking for the stored transfer syntax (``transfer-syntax=*``): MONAI Label's
        download asks for Explicit VR Little Endian, which makes the PACS transcode (Orthanc 1.10 cannot transcode
        JPEG 2000: HTTP 500). Files are written to a temporary folder first, then moved in place."""
        import shutil
        import tempfile

        from requests.exceptions import RequestException

        try:
            found = self._client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})
            if not found:
                raise HTTPException(status_code=404, detail=f"image {series_uid!r} not found in the PACS")
            study = found[0]["0020000D"]["Value"][0]
            instances = self._client.retrieve_series(study, series_uid, media_types=(("application/dicom", "*"),))
        except RequestException as err:
            raise HTTPException(status_code=502, detail=f"the PACS did not deliver series {series_uid}: {err}") from None
        tmp = tempfile.mkdtemp(prefix=".download_", dir=self._datastore.image_path())
        try:
            for inst in instances:
                inst.save_as(os.path.join(tmp, f"{inst.SOPInstanceUID}.dcm"))
            if os.path.isdir(image_dir):
                os.rmdir(image_dir)
            os.replace(tmp, image_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        check_uid(image_id)
        return super().get_image_info(image_id)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        check_uid(label_id, "label")
        check_tag(label_tag)
        return super().get_label_uri(label_id, label_tag, image_id)

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        """Upload a DICOM file with STOW-RS; the id is the new series UID."""
        series = dicom_web_upload_dcm(image_filename, self._client)
        self.refresh_list()
        return series

    @staticmethod
    def refresh_list() -> None:
        """Forget MONAI Label's cached series list (its TTL cache would hide a new series for a minute)."""
        cache = getattr(DICOMWebDatastore.list_images, "cache", None)
        if cache is not None:
            cache.clear()

    def remove_image(self, image_id: str) -> None:
        raise HTTPException(status_code=403, detail="images are not deleted from the PACS through MONAI Label")

    def remove_label(self, label_id: str, label_tag: str) -> None:
        check_uid(label_id, "label")
        check_tag(label_tag)
        return super().remove_label(label_id, label_tag)

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        check_uid(image_id)
        return super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        check_uid(label_id, "label")
        check_tag(label_tag)
        return super().update_label_info(label_id, label_tag, info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any],
                   label_id: str = "") -> str:
        """The stock ``save_label`` with the final label written as DICOM SEG by pydicom-seg (no dcmqi)."""
        check_uid(image_id)
        check_tag(label_tag)
        if image_id not in self.list_images():
            raise HTTPException(status_code=404, detail=f"image {image_id!r} not found in the datastore")
        image_uri = self.get_image_uri(image_id)
        output_file = ""
        if "".join(pathlib.Path(label_filename).suffixes) == ".bin":
            output_file = label_filename = binary_to_image(image_uri, label_filename)
        if label_tag == DefaultLabelTag.FINAL:
            seg_file = nifti_to_dicom_seg(image_uri, label_filename, label_info.get("label_info"), use_itk=False)
            if not seg_file:
                raise HTTPException(status_code=400, detail="the label is empty")
            series = dicom_web_upload_dcm(seg_file, self._client)
            image_info = self.get_image_info(image_id)
            label_info.update({"SeriesInstanceUID": series, "Modality": image_info.get("Modality"),
                               "StudyInstanceUID": image_info.get("StudyInstanceUID")})
            os.unlink(seg_file)
        label_id = super(DICOMWebDatastore, self).save_label(image_id, label_filename, label_tag, label_info)
        if output_file:
            os.unlink(output_file)
        return label_id

    def series_attributes(self) -> Dict[str, Dict[str, str]]:
        """``{series UID: {SeriesDescription, SeriesDate, SeriesTime, ...}}`` of the listed series (one QIDO query)."""
        from pydicom.dataset import Dataset

        out: Dict[str, Dict[str, str]] = {}
        for item in self._client.search_for_series(search_filters=self._search_filter, fields=list(SERIES_FIELDS)):
            ds = Dataset.from_json(item)
            uid = str(ds.get("SeriesInstanceUID", ""))
            if uid:
                out[uid] = {f: str(ds.get(f, "") or "") for f in SERIES_FIELDS}
        return out


def make_dicomweb_datastore(url: str) -> MammoDICOMWebDatastore:
    """MONAI Label's DICOMweb client set-up (``MONAI_LABEL_DICOMWEB_USERNAME`` / ``_PASSWORD``, the QIDO / WADO / STOW
    prefixes, the cache path) without the dcmqi download."""
    session = None
    if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
        session = create_session_from_user_pass(settings.MONAI_LABEL_DICOMWEB_USERNAME,
                                                settings.MONAI_LABEL_DICOMWEB_PASSWORD)
    client = DICOMwebClientX(url=url, session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                             wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                             stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
    cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
    return MammoDICOMWebDatastore(client, search_filter(), cache_path=cache or None,
                                  fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME)
