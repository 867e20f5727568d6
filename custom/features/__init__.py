"""PyRadiomics lesion features: extraction, feature files and their normalisation (the GCDM condition vector).

- :mod:`custom.features.radiomics`: the 67 feature names and their extraction (single lesion, or a parallel,
  cached batch over image / instance-map pairs).
- :mod:`custom.features.feature_file`: CSV (data set) and JSON (one case) feature files, validated on reading.
- :mod:`custom.features.normalisation`: min-max normaliser fitted on the training split, NO_LESION_VECTOR.
"""

from custom.features.feature_file import (
    ID_COLUMNS,
    read_feature_file,
    rows_to_matrix,
    write_feature_csv,
    write_feature_json,
)
from custom.features.normalisation import (
    NO_LESION_VECTOR,
    FeatureNormaliser,
    NormalisationReport,
    normalised_condition,
)
from custom.features.radiomics import (
    FEATURE_CLASSES,
    FEATURE_NAMES,
    INTENSITY_SCALE,
    FeatureExtractionResult,
    LesionJob,
    extract_features,
    extract_lesion_features,
    pyradiomics_version,
    read_image_png,
    read_instance_png,
)

__all__ = [
    "FEATURE_CLASSES",
    "FEATURE_NAMES",
    "ID_COLUMNS",
    "INTENSITY_SCALE",
    "NO_LESION_VECTOR",
    "FeatureExtractionResult",
    "FeatureNormaliser",
    "LesionJob",
    "NormalisationReport",
    "extract_features",
    "extract_lesion_features",
    "normalised_condition",
    "pyradiomics_version",
    "read_feature_file",
    "read_image_png",
    "read_instance_png",
    "rows_to_matrix",
    "write_feature_csv",
    "write_feature_json",
]
