"""Evaluation metrics of mammo_gcdm. Every function returns plain floats / dicts ready for a ``metrics.json``
(undefined values are ``None``, never NaN).

- :mod:`custom.metrics.controllability` - the GCDM protocol: a 3-class (background / breast / lesion) confusion
  matrix pooled over the set (Mass IoU, Breast IoU, pixel accuracy), per-image lesion Dice, and the 3-class
  prediction of a generated image (breast by threshold, lesion by the segmenter inside the breast);
- :mod:`custom.metrics.frechet` - the one Fréchet-distance implementation (float64, stable matrix root);
- :mod:`custom.metrics.radiomics_distance` - FD-radiomics67, the project's Fréchet distance of the 67 lesion (or
  breast) radiomic features, z-scored with the real set's statistics (not the published FRD; renamed from "frd");
- :mod:`custom.metrics.frd_published` - the published FRD (the ``frd-score`` package) on 8-bit PNG folders;
- :mod:`custom.metrics.inception` - the FID-Inception network for the standard pytorch-fid weights file;
- :mod:`custom.metrics.fid` - FID with a feature network from a local file, or FSD (Fréchet Segmenter Distance)
  with the lesion segmenter's encoder when there is none;
- :mod:`custom.metrics.image_quality` - diversity (mean pairwise MS-SSIM), reconstruction SSIM / PSNR, saturated (clipped) fraction of a region;
- :mod:`custom.metrics.segmenter` - the lesion segmenter (MONAI UNet, trained by ``train_segmenter.json``):
  loading, prediction, and its own score on real images (the controllability ceiling).
"""

from custom.metrics.controllability import (
    CLASS_NAMES,
    ConfusionAccumulator,
    controllability_metrics,
    lesion_box_roi,
    lesion_dice,
    segment_generated,
    summarise,
)
from custom.metrics.fid import FeatureDistance, SegmenterEncoder, embed_images, load_feature_network
from custom.metrics.radiomics_distance import (RadiomicsScaler, extract_radiomic_features, fd_radiomics67_metrics,
                                              feature_contributions, frechet_radiomics_distance)
from custom.metrics.frechet import frechet_distance, frechet_distance_from_features, gaussian_fit
from custom.metrics.image_quality import ms_ssim_diversity, ms_ssim_settings, reconstruction_metrics, saturated_fraction
from custom.metrics.segmenter import (
    SegmenterMeta,
    build_segmenter,
    lesion_probability,
    load_segmenter,
    predict_lesion,
    segmenter_score_on_prepared,
    segmenter_score_on_real,
)

__all__ = [
    "CLASS_NAMES",
    "ConfusionAccumulator",
    "FeatureDistance",
    "RadiomicsScaler",
    "SegmenterEncoder",
    "SegmenterMeta",
    "build_segmenter",
    "controllability_metrics",
    "embed_images",
    "extract_radiomic_features",
    "frechet_radiomics_distance",
    "fd_radiomics67_metrics",
    "feature_contributions",
    "frechet_distance",
    "frechet_distance_from_features",
    "gaussian_fit",
    "lesion_box_roi",
    "lesion_dice",
    "lesion_probability",
    "load_feature_network",
    "load_segmenter",
    "ms_ssim_diversity",
    "ms_ssim_settings",
    "predict_lesion",
    "reconstruction_metrics",
    "saturated_fraction",
    "segment_generated",
    "segmenter_score_on_prepared",
    "segmenter_score_on_real",
    "summarise",
]
