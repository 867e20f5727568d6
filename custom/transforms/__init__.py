"""Transforms, each with an array form and a dictionary (``...d``) form, as in MONAI."""

from custom.transforms.geometry import (
    ApplyGeometry,
    ApplyGeometryd,
    InvertGeometry,
    MammoGeometry,
    MammoGeometryd,
    compute_geometry,
)
from custom.transforms.loading import LoadMammogram, LoadMammogramd, enable_gpu_decoding
from custom.transforms.intensity import DicomGrayscale, DicomGrayscaled, apply_dicom_grayscale
from custom.transforms.masks import (
    BreastMask,
    BreastMaskd,
    LabelMap,
    LabelMapd,
    LesionSlots,
    LesionSlotsd,
    SoftMask,
    SoftMaskd,
    breast_mask,
    chest_wall_side,
    label_map,
    lesion_instances_from_boxes,
    lesion_instances_from_mask,
    soft_mask,
)
