"""Seeded, time-bounded fuzzing of every input gate: malformed DICOM MG files, masks, boxes, feature files and option
values go through the product's own entry points. Each must either succeed with a valid result or end in one
:class:`MammoInputError` that names the file or option - never another exception (a traceback), never a success for
an input that must be refused, and never a file left behind by a refused input."""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from custom.errors import MammoInputError

SEED = 20261130
BUDGET_S = 30.0  # the whole fuzz test stops generating after this many seconds (one core)
H, W = 48, 40


# ---------------------------------------------------------------------------------------------------- generators
def mg_dataset(rng: np.random.Generator) -> Dataset:
    """A valid small DICOM MG (left breast: bright half-ellipse on the left, air on the right)."""
    yy, xx = np.mgrid[:H, :W]
    breast = ((yy - H / 2) / (0.45 * H)) ** 2 + (xx / (0.7 * W)) ** 2 < 1
    img = np.where(breast, 2500 + 300 * rng.standard_normal((H, W)), 80 + 10 * rng.standard_normal((H, W)))
    px = np.clip(img, 0, 4095).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.Rows, ds.Columns = H, W
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 1500, 3000
    ds.ImageLaterality = "L"
    ds.PixelData = px.tobytes()
    return ds


def _raw_set(ds: Dataset, keyword: str, vr: str, value: bytes) -> None:
    """Put raw (possibly malformed) bytes into an element, as a broken writer would."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import RawDataElement

    tag = tag_for_keyword(keyword)
    ds[tag] = RawDataElement(pydicom.tag.Tag(tag), vr, len(value), value, 0, False, True)


def dicom_mutation(rng: np.random.Generator, ds: Dataset) -> tuple[str, bool]:
    """Apply one mutation; returns (its name, whether the file must be refused)."""
    kind = rng.integers(0, 20)
    if kind == 0:
        key = ["Rows", "Columns", "BitsAllocated", "NumberOfFrames", "BitsStored", "SamplesPerPixel"][rng.integers(0, 6)]
        val = [b"abc ", b"-3", b"1e9 ", b"\xff\xfe", b"", b"nan "][rng.integers(0, 6)]
        _raw_set(ds, key, "IS" if key == "NumberOfFrames" else "US", val)
        return f"{key}={val!r}", key != "NumberOfFrames" or val not in (b"",)
    if kind == 1:
        for key in ("Rows", "Columns")[: rng.integers(1, 3)]:
            delattr(ds, key)
        return "missing Rows/Columns", True
    if kind == 2:  # a valid Modality LUT Sequence (a linear LUT): must work
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 16]
        item.LUTData = list(np.linspace(0, 65535, 4096).astype(int))
        item.ModalityLUTType = "US"
        ds.ModalityLUTSequence = [item]
        return "modality LUT sequence", False
    if kind == 3:  # a broken LUT
        item = Dataset()
        item.LUTDescriptor = [int(rng.integers(0, 5)), int(rng.integers(-5, 5000)), 16]
        item.LUTData = [int(v) for v in rng.integers(0, 100, size=int(rng.integers(0, 4)))]
        ds.ModalityLUTSequence = [item]
        return "broken modality LUT", False  # may be refused or (if usable) applied
    if kind == 4:
        ds.WindowCenter = [float("nan"), float("inf"), 1e308, -1e308][rng.integers(0, 4)]
        return f"window center {ds.WindowCenter}", True
    if kind == 5:
        ds.WindowWidth = [0.0, -5.0, float("nan"), float("inf")][rng.integers(0, 4)]
        return f"window width {ds.WindowWidth}", True
    if kind == 6:
        value = [b"nan ", b"inf ", b"1e400 ", b"abc "][rng.integers(0, 4)]
        _raw_set(ds, "RescaleSlope", "DS", value)
        ds.RescaleIntercept = 0
        return f"rescale slope {value!r}", True
    if kind == 7:
        ds.PixelData = b"\x00\x10" * (H * W)  # constant image
        return "constant image", True
    if kind == 8:
        ds.PixelData = ds.PixelData[: int(rng.integers(0, len(ds.PixelData)))]
        return "truncated pixel data", True
    if kind == 9:
        ds.PhotometricInterpretation = ["RGB", "PALETTE COLOR", "", "MONOCHROME3"][rng.integers(0, 4)]
        return f"photometric {ds.PhotometricInterpretation!r}", True
    if kind == 10:
        ds.PresentationLUTShape = ["INVERSE", "IDENTITY", "bogus"][rng.integers(0, 3)]
        return f"presentation LUT {ds.PresentationLUTShape}", False
    if kind == 11:
        ds.Modality = ["CT", "", "MR"][rng.integers(0, 3)]
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage: neither tag says mammogram
        return f"modality {ds.Modality!r}", True
    if kind == 12:
        del ds.PixelData
        return "no pixel data", True
    if kind == 13:
        ds.WindowCenter, ds.WindowWidth = 100000, 1  # maps every pixel to 0: no dynamic range
        return "window outside the data", True
    if kind == 14:
        ds.VOILUTFunction = ["SIGMOID", "LINEAR_EXACT", "NONSENSE"][rng.integers(0, 3)]
        return f"VOI function {ds.VOILUTFunction}", ds.VOILUTFunction == "NONSENSE"
    if kind == 15:
        _raw_set(ds, "PixelSpacing", "DS", [b"abc\\def", b"1e999\\1", b"\\"][rng.integers(0, 3)])
        return "malformed pixel spacing", False
    if kind == 16:
        ds.PixelPaddingValue = int(rng.integers(0, 4096))
        return "pixel padding", False
    if kind == 17:
        ds.NumberOfFrames = int(rng.integers(2, 5))
        return "multi-frame", True
    return "valid", False


def write_dicom(path: Path, ds: Dataset) -> bool:
    try:
        ds.save_as(str(path), enforce_file_format=True)
        return True
    except Exception:
        try:
            with open(path, "wb") as f:
                pydicom.dcmwrite(f, ds, enforce_file_format=False)
            return True
        except Exception:
            return False


def fuzz_text(rng: np.random.Generator) -> str:
    pieces = ["[", "]", ",", "1", "-2", "1e400", "nan", "inf", "9" * 40, "{", "}", '"a"', " ", "0.5", "null", "true"]
    return "".join(pieces[i] for i in rng.integers(0, len(pieces), size=int(rng.integers(0, 30))))


# ---------------------------------------------------------------------------------------------------- harness
class Tally:
    def __init__(self) -> None:
        self.start = time.monotonic()
        self.counts: dict[str, int] = {}
        self.failures: list[str] = []

    def time_left(self) -> bool:
        return time.monotonic() - self.start < BUDGET_S

    def check(self, what: str, fn, must_fail: bool, source_hint: str | None = None, after=None):
        """Run ``fn``: accepted exceptions are MammoInputError whose message names ``source_hint``; a must-fail
        input that succeeds is a failure; ``after(result_or_None)`` checks invariants (e.g. nothing written)."""
        self.counts[what] = self.counts.get(what, 0) + 1
        try:
            result = fn()
        except MammoInputError as err:
            if "\n" in str(err):
                self.failures.append(f"{what}: multi-line error {str(err)[:200]!r}")
            if source_hint is not None and source_hint not in str(err):
                self.failures.append(f"{what}: error does not name {source_hint!r}: {str(err)[:200]}")
            if after is not None:
                after(None)
            return None
        except Exception as err:  # a traceback for the user
            self.failures.append(f"{what}: {type(err).__name__}: {str(err)[:200]}")
            return None
        if must_fail:
            self.failures.append(f"{what}: accepted an input that must be refused")
        if after is not None:
            after(result)
        return result


@pytest.fixture(scope="module")
def norm_file(tmp_path_factory) -> Path:
    from custom.features.normalisation import FeatureNormaliser

    path = tmp_path_factory.mktemp("fuzz_norm") / "feature_normalisation.json"
    FeatureNormaliser().fit(np.random.default_rng(0).uniform(0, 100, (10, 67))).save(path)
    return path


def test_fuzzed_inputs_end_in_one_clear_error_or_a_valid_result(tmp_path, norm_file):
    from custom.data.cases import MammoCase
    from custom.data.conditions import build_conditions
    from custom.data.prepare import PreprocessSettings, load_display_image, preprocess_case
    from custom.engines.inference import build_inference_cases
    from custom.features import FEATURE_NAMES
    from custom.features.feature_file import read_feature_file, write_feature_csv

    rng = np.random.default_rng(SEED)
    tally = Tally()
    settings = PreprocessSettings(image_size=32)
    # valid building blocks
    yy, xx = np.mgrid[:H, :W]
    breast = (((yy - H / 2) / (0.45 * H)) ** 2 + (xx / (0.7 * W)) ** 2 < 1).astype(np.uint8)
    Image.fromarray(breast * 255).save(tmp_path / "breast.png")
    row = {"case_id": "c", "lesion_index": 0, **{n: float(v) for n, v in zip(FEATURE_NAMES, rng.uniform(1, 90, 67))}}
    write_feature_csv(tmp_path / "one.csv", [row])
    box = [4, 20, 12, 28]

    i = 0
    while tally.time_left() and i < 600:
        i += 1
        target = i % 6
        if target == 0:  # ------------------------------------------------------------- DICOM MG files
            ds = mg_dataset(rng)
            name, must_fail = dicom_mutation(rng, ds)
            path = tmp_path / f"fuzz_{i}.dcm"
            if not write_dicom(path, ds):
                continue

            def load(path=path):
                img, _ = load_display_image(path)
                assert img.shape == (H, W) and np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
                return img

            tally.check(f"dicom[{name}]", load, must_fail, source_hint=str(path))
            out = tmp_path / f"prep_{i}"

            def nothing_written(result, out=out):
                if result is None and out.exists() and any(out.rglob("*")):
                    tally.failures.append(f"prepare[{name}]: files left behind: {sorted(map(str, out.rglob('*')))[:3]}")

            tally.check(f"prepare[{name}]", lambda path=path, out=out: preprocess_case(
                MammoCase(case_id="x", image_path=str(path), study_id="s"), str(out), settings), must_fail,
                after=nothing_written)
        elif target == 1:  # ---------------------------------------------------------- lesion masks
            kind = rng.integers(0, 6)
            path = tmp_path / f"mask_{i}.png"
            if kind == 0:
                arr = rng.integers(0, 256, (H, W)).astype(np.uint8)
            elif kind == 1:
                arr = np.zeros((H, W), np.uint8)
            elif kind == 2:
                arr = np.zeros((H + 1, W), np.uint8)
                arr[20:25, 5:10] = 1
            elif kind == 3:
                path = tmp_path / f"mask_{i}.nii.gz"
                path.write_bytes(rng.bytes(int(rng.integers(0, 400))))
            elif kind == 4:
                path = tmp_path / f"mask_{i}.dcm"
                path.write_bytes(b"\x00" * 128 + b"DICM" + rng.bytes(int(rng.integers(0, 300))))
            else:
                arr = np.zeros((H, W), np.uint8)
                arr[20:26, 4:10] = 1
            if path.suffix == ".png":
                Image.fromarray(arr).save(path)
            must_fail = kind in (1, 2, 3, 4)
            tally.check("mask", lambda path=path: build_conditions(
                image_size=32, normaliser_file=norm_file, breast_mask_file=tmp_path / "breast.png",
                lesion_mask_file=path, feature_file=tmp_path / "one.csv"), must_fail and kind != 0)
        elif target == 2:  # ---------------------------------------------------------- boxes
            text = fuzz_text(rng) if rng.random() < 0.8 else "[" * int(rng.integers(500, 5000)) + "1"
            tally.check("lesion_box", lambda text=text: build_conditions(
                image_size=32, normaliser_file=norm_file, breast_mask_file=tmp_path / "breast.png", lesion_box=text,
                feature_file=tmp_path / "one.csv"), False, source_hint=None)
        elif target == 3:  # ---------------------------------------------------------- feature files
            fmt = "json" if rng.random() < 0.5 else "csv"
            path = tmp_path / f"feat_{i}.{fmt}"
            bad = dict(row)
            key = FEATURE_NAMES[int(rng.integers(0, 67))]
            choice = rng.integers(0, 7)
            must_fail = True
            if choice == 0:
                bad[key] = ["nan", "inf", "1e400", "abc", ""][rng.integers(0, 5)]
            elif choice == 1:
                bad["lesion_index"] = ["-1", "9" * 30, "1.5", "²", "abc"][rng.integers(0, 5)]
            elif choice == 2:
                del bad[key]
            elif choice == 3:
                bad["unknown_feature"] = 1.0
            else:
                must_fail = False
            if fmt == "csv":
                buf = io.StringIO()
                w = csv.DictWriter(buf, fieldnames=list(bad))
                w.writeheader()
                w.writerow(bad)
                text = buf.getvalue()
                if choice == 5:
                    text = text[: int(rng.integers(0, len(text)))]
                    must_fail = None
            else:
                feats = {k: v for k, v in bad.items() if k not in ("case_id", "lesion_index")}
                obj = {"case_id": "c", "lesions": [{"lesion_index": bad["lesion_index"], "features": feats}]}
                text = json.dumps(obj)
                if choice == 5:
                    text = "[" * int(rng.integers(1000, 20000)) + "]" * 3
                    must_fail = True
                elif choice == 6:
                    text = text.replace('"lesion_index": 0', '"lesion_index": ' + "9" * int(rng.integers(400, 6000)))
                    must_fail = True
            path.write_text(text)
            tally.check(f"feature_file[{choice}]", lambda path=path: read_feature_file(path), bool(must_fail),
                        source_hint=str(path))
        elif target == 4:  # ---------------------------------------------------------- option values
            option = ["num_samples", "seed", "keep_dilation", "case_id"][rng.integers(0, 4)]
            value = [["0", "-1", "abc", "1e400", "nan", 10**30, "2.5", True][rng.integers(0, 8)],
                     ["-5", "x", 2**70, "inf", None][rng.integers(0, 5)],
                     ["-1", "1e9", "nan", "a"][rng.integers(0, 4)],
                     ["../x", "a/b", "", "x" * 300, "ok\n", "."][rng.integers(0, 6)]][
                ["num_samples", "seed", "keep_dilation", "case_id"].index(option)]
            kw = dict(image_size=32, normaliser_file=norm_file, max_lesions=2, breast_mask_file=str(tmp_path / "breast.png"),
                      lesion_box=box, feature_file=str(tmp_path / "one.csv"))
            kw[option] = value
            tally.check(f"option[{option}]", lambda kw=kw: build_inference_cases(**kw), True, source_hint=option)
        else:  # ------------------------------------------------------------------- paths
            long = "p" * int(rng.integers(256, 400))
            option = ["mask_file", "feature_file", "breast_mask_file", "source_image"][rng.integers(0, 4)]
            kw = dict(image_size=32, normaliser_file=norm_file, max_lesions=2, breast_mask_file=str(tmp_path / "breast.png"),
                      lesion_box=box, feature_file=str(tmp_path / "one.csv"))
            kw.pop("breast_mask_file" if option == "mask_file" else "lesion_box" if option == "mask_file" else "", None)
            if option == "mask_file":
                kw.pop("lesion_box")
            kw[option] = str(tmp_path / long / "x.png")
            tally.check(f"path[{option}]", lambda kw=kw: build_inference_cases(**kw), True, source_hint=option)
    total = sum(tally.counts.values())
    assert total >= 200, f"only {total} fuzz cases in {BUDGET_S} s"
    assert not tally.failures, f"{len(tally.failures)} of {total} fuzz cases failed:\n" + "\n".join(tally.failures[:25])


def test_fuzzed_options_through_the_bundle_entry_fail_before_any_sampling(tmp_path, norm_file):
    """The in-process ``monai.bundle run inference`` with bad option values: one input error before the model is
    even loaded (the checkpoint folder does not exist), nothing written."""
    from monai.bundle import run

    from custom.engines.inference import describe_error

    repo = Path(__file__).resolve().parents[1]
    yy, xx = np.mgrid[:H, :W]
    breast = (((yy - H / 2) / (0.45 * H)) ** 2 + (xx / (0.7 * W)) ** 2 < 1).astype(np.uint8)
    Image.fromarray(breast * 255).save(tmp_path / "breast.png")
    cases = {"num_samples": "abc", "seed": "1e400", "keep_dilation": -1, "ddim_steps": "nan", "guidance_scale": "inf",
             "case_id": "../outside", "output_dir": str(tmp_path / ("o" * 300))}
    for option, value in cases.items():
        out = tmp_path / f"out_{option}"
        kw = dict(output_dir=str(out), breast_mask_file=str(tmp_path / "breast.png"), normaliser_file=str(norm_file),
                  ckpt_dir=str(tmp_path / "no_model"), progress=False, mode="keep" if option == "keep_dilation" else "generate")
        if option == "keep_dilation":
            kw["image_file"] = str(tmp_path / "breast.png")
        kw[option] = value
        with pytest.raises(Exception) as err:
            run("inference", config_file=[str(repo / "bundle/configs/inference.json"), str(repo / "tests/configs/inf_tiny.json")],
                meta_file=str(repo / "bundle/configs/metadata.json"), logging_file=False, **kw)
        msg = describe_error(err.value)
        assert msg is not None and option in msg, (option, repr(err.value)[:300])
        assert not out.exists() or not any(out.iterdir()), option
