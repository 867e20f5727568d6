"""mammo_gcdm: GCDM (gated conditional latent diffusion) mammogram synthesis as a MONAI bundle.

Sub-packages, one concern each, from the bottom layer up (a module imports only its own layer and those below;
``tests/test_layering.py``):

- ``custom.errors``, ``custom.io``, ``custom.checkpoints``: input errors, atomic writes, checkpoint files.
- ``custom.dicom``: DICOM MG reading (VOI LUT, photometric interpretation, headers).
- ``custom.transforms``: grayscale pipeline, breast geometry, masks and the soft mask (array + dictionary forms).
- ``custom.features``: PyRadiomics feature extraction, feature files, their normalisation, lesion presets.
- ``custom.data``: dataset adapters (VinDr-Mammo, folders), the phantom generator, ``prepare``, conditions, synthetic-output writers.
- ``custom.networks``: gated fusion, mask CLIP encoder, lesion conditioner, the GCDM denoiser.
- ``custom.engines``: Ignite trainers/evaluators (``monai.engines``), prepare-batch classes, inferers, handlers,
  DDIM sampling, checkpoints, the inference, evaluation, synthesize (sharded synthetic cohorts) and downstream
  (task model on real / real+synthetic / synthetic) workflows.
- ``custom.metrics``: controllability (pooled IoU, Dice), FD-radiomics67 and the published FRD, FID/segmenter-feature distance, diversity.
- ``custom.workflows``: the bundle as a whole (bundle root, options, the recorded model definition) and export.
- ``custom.label_app``: the MONAI Label app (runs in its own environment, calls the bundle's inference).
"""

__version__ = "0.9.2"

import logging as _logging

# MONAI registers an optional GPU (nvImageCodec) DICOM decoder and warns in every process when it is absent;
# pydicom's own decoders (pylibjpeg plugins) are what this package uses.
_logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(_logging.ERROR)
