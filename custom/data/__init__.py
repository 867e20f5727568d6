"""Data: DICOM MG reading, dataset adapters (VinDr-Mammo, generic folder), the phantom generator, ``prepare``."""

from custom.data.cases import Finding, MammoCase, Skipped, assign_split
from custom.dicom import MammoDicomReader, grayscale_params, read_dicom_header
from custom.data.folder import load_folder_cases
from custom.data.mask_io import load_mask_file
from custom.data.prepare import PrepareWorkflow, PreprocessSettings, load_display_image, preprocess_case
from custom.data.vindr import load_vindr_cases
from custom.data.conditions import Conditions, build_conditions
from custom.data.export import export_sample, write_png16, write_synthetic_dicom
