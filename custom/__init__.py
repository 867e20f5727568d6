"""mammo_gcdm: GCDM (gated conditional latent diffusion) mammogram synthesis as a MONAI bundle.

Sub-packages, one concern each:

- ``custom.data``: DICOM MG reading, dataset adapters (VinDr-Mammo, folders), the phantom generator, ``prepare``.
- ``custom.transforms``: grayscale pipeline, breast geometry, masks and the soft mask (array + dictionary forms).
- ``custom.features``: PyRadiomics feature extraction, feature files and their normalisation.
"""

__version__ = "0.1.0"

import logging as _logging

# MONAI registers an optional GPU (nvImageCodec) DICOM decoder and warns in every process when it is absent;
# pydicom's own decoders (pylibjpeg plugins) are what this package uses.
_logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(_logging.ERROR)
