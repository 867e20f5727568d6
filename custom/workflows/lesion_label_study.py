"""Does a requested per-lesion BI-RADS show in the generated lesion? The reconstruction loop for lesion labels.

For a model trained with ``lesion_label_names`` (:mod:`custom.data.lesion_labels`), on a prepared (phantom) dataset:

1. **Reader.** :class:`~custom.metrics.attribute_classifier.MalignancyReader` (benign-looking BI-RADS 2-3 vs
   malignant-looking 4-5 from the 67 radiomic features) fitted on the real training lesions, every feature measured
   in the model frame (the prepared image resized to the model's side as in training). Its accuracy on the real
   validation + test lesions is the ceiling.
2. **Generation.** Every test image with a lesion is generated three times with one seed, through the bundle's own
   inference workflow (datalist mode): lesion 0 labelled with its own finding's BI-RADS (``own``), with BI-RADS 2 and
   with BI-RADS 5 (``--lesion_labels birads=…``; other lesions keep their own). Twice over: with each lesion's own
   radiomic features (``own features``: the label competes with features that already describe the lesion) and with
   one *neutral* feature row for every lesion (the training median of each raw feature: the label is then the only
   thing that says what kind of lesion to draw).
3. **Read-back.** The reader's probability of "malignant-looking" on generated lesion 0, per request: the mean, the
   share of lesions where BI-RADS 5 reads more malignant than BI-RADS 2 (same seed, same mask), and the accuracy
   of reading the requested class. And reader-free (:func:`pixel_effects`): how far the lesion's pixels move between
   BI-RADS 5 and 2, and between the lesion's own and the neutral features, against the real lesions' contrast.
4. **Context reach** (:func:`context_reach`): how much the noise prediction itself changes when the features are
   swapped or the whole cross-attention context is made unconditional (also for other models, ``--reach``).

CLI::

    python -m custom.workflows.lesion_label_study --prepared_dir data/prepared --ckpt_dir runs/label_models \\
        --output runs/lesion_label_study [--ddim_steps 20 --seed 0 --max_cases N]

Writes ``<output>/lesion_label_study.json`` (and the samples under ``<output>/<features>/<request>/``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from custom.data.training import model_frame, prepared_transforms
from custom.errors import MammoInputError
from custom.io import atomic_write_json

__all__ = ["REQUESTS", "model_frame_lesions", "fit_reader", "neutral_prepared_copy", "read_back", "pixel_effects",
           "context_reach", "model_reach", "run_study", "main"]

logger = logging.getLogger(__name__)
CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"
#: lesion-0 requests: its own finding's BI-RADS, then the two ends of the scale the phantom has
REQUESTS = ("own", "2", "5")


def _malignant(birads: Any) -> bool | None:
    from custom.features.presets import malignancy_from_birads

    m = malignancy_from_birads(birads)
    return None if m is None else m == "malignant"


def model_frame_lesions(prepared_dir: str | os.PathLike, splits: Sequence[str], image_size: int,
                        params_file: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Every lesion of ``splits`` with a BI-RADS: ``{"case_id", "lesion_index", "malignant", "features" (67 raw)}``,
    the features measured on the prepared image and lesion mask brought to ``image_size`` exactly as training does
    (:func:`custom.data.training.prepared_transforms`)."""
    from custom.data.conditions import DEFAULT_PARAMS_FILE
    from custom.features import FEATURE_NAMES, extract_lesion_features

    root = Path(prepared_dir)
    datalist = json.loads((root / "datalist.json").read_text())
    xf = prepared_transforms(image_size=int(image_size), max_lesions=8)
    out = []
    for split in splits:
        for e in datalist.get(split, []):
            findings = sorted(e.get("findings") or [], key=lambda f: int(f.get("lesion_index", 0)))
            if not findings:
                continue
            item = model_frame(xf, root, e)
            image = item["image"][0].numpy().astype(np.float64)
            for f in findings:
                k = int(f.get("lesion_index", 0))
                mal = _malignant(f.get("birads"))
                mask = item["lesion_masks"][k].numpy() > 0
                if mal is None or not mask.any():
                    continue
                try:
                    feats = extract_lesion_features(image, mask, params_file or DEFAULT_PARAMS_FILE)
                except MammoInputError as err:  # e.g. a lesion of a few pixels at a small model side
                    logger.warning("%s lesion %d left out of the reader: %s", e["case_id"], k, err)
                    continue
                out.append({"case_id": e["case_id"], "lesion_index": k, "malignant": mal, "split": split,
                            "features": [float(feats[n]) for n in FEATURE_NAMES]})
    return out


def fit_reader(train: Sequence[Mapping[str, Any]], held_out: Sequence[Mapping[str, Any]]):
    """The reader fitted on ``train`` lesions and its accuracy on ``held_out`` ones (the real ceiling)."""
    from custom.metrics.attribute_classifier import MalignancyReader

    reader = MalignancyReader.fit([r["features"] for r in train], [r["malignant"] for r in train])
    probs = reader.probability([r["features"] for r in held_out])
    truth = np.array([r["malignant"] for r in held_out])
    ceiling = {"accuracy": float(((probs >= 0.5) == truth).mean()), "n": len(held_out),
               "mean_p_malignant": {"benign (BI-RADS 2-3)": float(probs[~truth].mean()),
                                    "malignant (BI-RADS 4-5)": float(probs[truth].mean())}}
    train_acc = float(((reader.probability([r["features"] for r in train]) >= 0.5)
                       == np.array([r["malignant"] for r in train])).mean())
    return reader, {**ceiling, "train_accuracy": train_acc, "n_train": len(train)}


def neutral_prepared_copy(prepared_dir: str | os.PathLike, folder: str | os.PathLike, neutral: bool,
                          max_cases: int | None = None) -> Path:
    """A prepared folder for the generation runs: the test images with a lesion (first ``max_cases``), links to the
    source's images / labels / lesion maps, its normaliser, and its feature file, or (``neutral``) that file with
    every lesion's row replaced by the training lesions' median of each raw feature."""
    import csv

    src, dst = Path(prepared_dir), Path(folder)
    dst.mkdir(parents=True, exist_ok=True)
    datalist = json.loads((src / "datalist.json").read_text())
    test = [e for e in datalist["test"] if int(e.get("num_lesions", 0)) > 0]
    if max_cases:
        test = test[: int(max_cases)]
    for sub in ("images", "labels", "lesions", "records"):
        link = dst / sub
        if not link.exists() and (src / sub).exists():
            link.symlink_to((src / sub).resolve(), target_is_directory=True)
    atomic_write_json(dst / "datalist.json", {"training": [], "validation": [], "test": test})
    (dst / "feature_normalisation.json").write_bytes((src / "feature_normalisation.json").read_bytes())
    with open(src / "features.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = list(reader.fieldnames or []), list(reader)
    if neutral:
        train_ids = {str(e["case_id"]) for e in datalist["training"]}
        from custom.features import FEATURE_NAMES

        med = {n: float(np.median([float(r[n]) for r in rows if r["case_id"] in train_ids])) for n in FEATURE_NAMES}
        rows = [{**r, **{n: repr(v) for n, v in med.items()}} for r in rows]
    with open(dst / "features.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return dst


def read_back(reader, samples: Path, prepared: Path, image_size: int, seed: int,
              params_file: str | os.PathLike | None = None) -> dict[str, float]:
    """``{case_id: P(malignant-looking)}`` of lesion 0 of every generated test sample in ``samples``."""
    from PIL import Image

    from custom.data.conditions import DEFAULT_PARAMS_FILE
    from custom.features import FEATURE_NAMES, extract_lesion_features

    xf = prepared_transforms(image_size=int(image_size), max_lesions=8)
    out = {}
    for e in json.loads((prepared / "datalist.json").read_text())["test"]:
        png = samples / f"{e['case_id']}_seed{seed}.png"
        if not png.is_file():
            raise MammoInputError(png, "generated sample missing")
        with Image.open(png) as im:
            arr = np.asarray(im)
        image = arr.astype(np.float64) / float(np.iinfo(arr.dtype).max)
        item = model_frame(xf, prepared, e)
        mask = item["lesion_masks"][0].numpy() > 0
        try:
            feats = extract_lesion_features(image, mask, params_file or DEFAULT_PARAMS_FILE)
        except MammoInputError as err:  # too few pixels at a small model side: not read (nan), counted by the caller
            logger.warning("%s: generated lesion 0 not read: %s", e["case_id"], err)
            out[str(e["case_id"])] = float("nan")
            continue
        out[str(e["case_id"])] = float(reader.probability([[float(feats[n]) for n in FEATURE_NAMES]])[0])
    return out


def _sample_and_mask(samples: Path, prepared: Path, entry: Mapping[str, Any], size: int, seed: int, xf: Any):
    """A generated sample ``(S, S)`` in [0, 1], the real image and lesion 0's mask at the model side."""
    from PIL import Image

    with Image.open(samples / f"{entry['case_id']}_seed{seed}.png") as im:
        arr = np.asarray(im)
    item = model_frame(xf, prepared, entry)
    return arr.astype(np.float64) / float(np.iinfo(arr.dtype).max), item["image"][0].numpy(), item["lesion_masks"][0].numpy() > 0


def _contrast(image: np.ndarray, mask: np.ndarray, ring: int) -> tuple[float, float]:
    """Lesion contrast (mean inside - mean of a ``ring``-pixel ring outside) and the standard deviation inside."""
    from scipy import ndimage

    around = ndimage.binary_dilation(mask, iterations=int(ring)) & ~mask
    return float(image[mask].mean() - image[around].mean()), float(image[mask].std())


def pixel_effects(out: Path, prepared: Path, size: int, seed: int, source_prepared: Path | None = None,
                  ring: int = 3) -> dict[str, Any]:
    """How much each condition moves the lesion's pixels, reader-free: the mean over test lesions of the mean absolute
    difference inside lesion 0 between two samples of the same seed and mask - BI-RADS 5 vs 2 (own features), own
    vs neutral features (own label) - next to the real lesions' contrast (|mean inside - mean of a ``ring``-pixel
    ring outside|, the size of the thing being controlled). And the direction: lesion contrast and the standard
    deviation inside the lesion of the generated lesions at BI-RADS 2 and 5, beside those of the real benign-looking
    (2-3) and malignant-looking (4-5) lesions 0 of every split of ``source_prepared``."""

    xf = prepared_transforms(image_size=int(size), max_lesions=8)
    rows: dict[str, list[float]] = {"birads_5_vs_2": [], "features_own_vs_neutral": [], "real_lesion_contrast": []}
    direction: dict[str, list[tuple[float, float]]] = {"generated BI-RADS 2": [], "generated BI-RADS 5": []}
    for e in json.loads((prepared / "datalist.json").read_text())["test"]:
        s5, real, mask = _sample_and_mask(out / "own" / "5", prepared, e, size, seed, xf)
        s2, _, _ = _sample_and_mask(out / "own" / "2", prepared, e, size, seed, xf)
        own, _, _ = _sample_and_mask(out / "own" / "own", prepared, e, size, seed, xf)
        neutral, _, _ = _sample_and_mask(out / "neutral" / "own", prepared, e, size, seed, xf)
        if not mask.any():
            continue
        rows["birads_5_vs_2"].append(float(np.abs(s5 - s2)[mask].mean()))
        rows["features_own_vs_neutral"].append(float(np.abs(own - neutral)[mask].mean()))
        rows["real_lesion_contrast"].append(abs(_contrast(real, mask, ring)[0]))
        direction["generated BI-RADS 2"].append(_contrast(s2, mask, ring))
        direction["generated BI-RADS 5"].append(_contrast(s5, mask, ring))
    if source_prepared is not None:
        direction["real benign-looking (2-3)"], direction["real malignant-looking (4-5)"] = [], []
        for split in ("training", "validation", "test"):
            for e in json.loads((Path(source_prepared) / "datalist.json").read_text()).get(split, []):
                f0 = [f for f in e.get("findings") or [] if int(f.get("lesion_index", 0)) == 0]
                mal = _malignant(f0[0].get("birads")) if f0 else None
                if mal is None:
                    continue
                item = model_frame(xf, source_prepared, e)
                mask = item["lesion_masks"][0].numpy() > 0
                if mask.any():
                    key = "real malignant-looking (4-5)" if mal else "real benign-looking (2-3)"
                    direction[key].append(_contrast(item["image"][0].numpy(), mask, ring))
    res: dict[str, Any] = {k: float(np.mean(v)) if v else float("nan") for k, v in rows.items()}
    res["lesion_contrast_and_std"] = {k: {"contrast": float(np.mean([a for a, _ in v])),
                                          "std_inside": float(np.mean([b for _, b in v])), "n": len(v)}
                                      for k, v in direction.items() if v}
    return res


@torch.no_grad()
def context_reach(network: torch.nn.Module, mask_latent: torch.Tensor, features: torch.Tensor,
                  alt_features: torch.Tensor, lesion_masks: torch.Tensor, lesion_present: torch.Tensor,
                  timestep: int = 500, seed: int = 0, **extra: torch.Tensor) -> dict[str, float]:
    """How far the cross-attention context reaches the noise prediction: at one noisy latent ``x_t`` (seeded
    normal, the given soft-mask latents, ``timestep``), the mean absolute change of ``eps`` when every lesion's
    features are swapped for ``alt_features`` (``features``), and when the whole context is replaced by the
    unconditional one (``context``; the mask-latent channels are kept in both), each relative to the mean absolute
    ``eps``. ``0`` means the network ignores its tokens.

    Args:
        network: a GCDM denoiser (``context`` + ``unet``); ``mask_latent`` ``(B, C_m, h, w)``; ``features`` /
            ``alt_features`` ``(B, L, 67)``; ``lesion_masks`` ``(B, L, H, W)``; ``lesion_present`` ``(B, L)``;
            ``extra``: more network inputs (``attributes``, ``lesion_labels``).
    """
    b = mask_latent.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn((b, int(network.latent_channels), *mask_latent.shape[2:]), generator=gen).to(mask_latent.device)
    t = torch.full((b,), int(timestep), dtype=torch.long, device=x.device)
    none = torch.zeros(b, dtype=torch.bool, device=x.device)
    every = torch.ones(b, dtype=torch.bool, device=x.device)

    def eps(feats: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        ctx = network.context(feats, lesion_masks, lesion_present, drop, drop, **extra)
        return network(x, t, mask_latent, feats, lesion_masks, lesion_present, none, none, context=ctx, **extra)

    base = eps(features, none)
    scale = float(base.abs().mean())
    return {"features": float((eps(alt_features, none) - base).abs().mean()) / scale,
            "context": float((eps(features, every) - base).abs().mean()) / scale,
            "eps_mean_abs": scale, "timestep": int(timestep), "n": int(b)}


def model_reach(ckpt_dir: str | os.PathLike, own: Path, neutral: Path, model_overrides: Mapping[str, Any] | None = None,
                timestep: int = 500, seed: int = 0) -> dict[str, float]:
    """:func:`context_reach` of a bundle model (``ckpt_dir``) on the test cases of two prepared copies (the lesions'
    own and the neutral features; :func:`neutral_prepared_copy`), the soft masks encoded by the model's stage 1."""
    from custom.engines.edit import build_edit_cases
    from custom.transforms.masks import soft_mask
    from custom.workflows.bundle import BundleModel

    ckpt = Path(ckpt_dir)
    model = BundleModel(CONFIGS.parent, ckpt / "model.pt", ckpt / "autoencoder.pt", "cpu", overrides=model_overrides)
    cfg = model.config
    batches = []
    for copy in (own, neutral):
        cases = build_edit_cases(mode="generate", image_size=int(cfg["image_size"]), max_lesions=int(cfg["max_lesions"]),
                                 normaliser_file=str(ckpt / "feature_normalisation.json"), datalist=str(copy / "datalist.json"),
                                 split="test", seed=0, num_samples=1, lesion_label_names=cfg.get("lesion_label_names") or [])
        batches.append(cases.cases)
    cases, alt = batches

    def stack(arrs: Any) -> torch.Tensor:
        return torch.as_tensor(np.stack(list(arrs))).float()

    label = stack([c.conditions.label[None] for c in cases])
    mask_latent = model.latent_encoder.encode_mask(soft_mask(label, sigma=float(cfg["sigma"])))
    extra = {}
    if cfg.get("attribute_names"):  # every attribute "not given"
        extra["attributes"] = torch.full((len(cases), len(cfg["attribute_names"])), -1, dtype=torch.long)
    if cfg.get("lesion_label_names"):
        extra["lesion_labels"] = torch.as_tensor(np.stack([c.extra["lesion_label_codes"] for c in cases])).long()
    return context_reach(model.network, mask_latent, stack(c.conditions.features for c in cases),
                         stack(c.conditions.features for c in alt), stack(c.conditions.lesion_masks for c in cases),
                         stack(c.conditions.lesion_present for c in cases), timestep, seed, **extra)


def run_study(prepared_dir: str | os.PathLike, ckpt_dir: str | os.PathLike, output: str | os.PathLike,
              ddim_steps: int = 20, seed: int = 0, max_cases: int | None = None,
              model_overrides: Mapping[str, Any] | None = None,
              reach_ckpt_dirs: Sequence[str | os.PathLike] = ()) -> dict[str, Any]:
    """The whole study (module docstring); returns and writes ``<output>/lesion_label_study.json``.
    ``reach_ckpt_dirs``: more bundle models whose :func:`context_reach` is measured on the same cases.
    ``model_overrides``: model keys passed to inference (e.g. ``lesion_label_mode`` for a checkpoint whose record
    predates that key; a recorded key that differs is refused by inference)."""
    import time

    from monai.bundle import run

    prepared, ckpt, out = Path(prepared_dir), Path(ckpt_dir), Path(output)
    info = json.loads((ckpt / "diffusion_info.json").read_text())
    if "lesion_birads" not in (info.get("lesion_label_names") or []):
        raise MammoInputError(ckpt / "diffusion_info.json", "the model was trained without lesion_birads in "
                                                           "lesion_label_names: nothing to study")
    size = int(info["image_size"])
    t0 = time.time()
    lesions = model_frame_lesions(prepared, ("training", "validation", "test"), size)
    reader, ceiling = fit_reader([r for r in lesions if r["split"] == "training"],
                                 [r for r in lesions if r["split"] != "training"])
    truth = {r["case_id"]: r["malignant"] for r in lesions if r["split"] == "test" and r["lesion_index"] == 0}
    results: dict[str, Any] = {"reader": {"kind": "MalignancyReader (logistic regression on 67 radiomic features, "
                                                  "model frame)", **ceiling},
                               "model": {"ckpt_dir": str(ckpt), "lesion_label_names": info["lesion_label_names"],
                                         "iteration": info.get("iteration"), "overrides": dict(model_overrides or {}),
                                         "last_val_noise_mse": info.get("last_val_noise_mse")},
                               "settings": {"ddim_steps": int(ddim_steps), "seed": int(seed), "image_size": size},
                               "conditions": {}}
    for source in ("own features", "neutral features"):
        copy = neutral_prepared_copy(prepared, out / "prepared" / source.split()[0], source.startswith("neutral"),
                                     max_cases)
        probs: dict[str, dict[str, float]] = {}
        for request in REQUESTS:
            samples = out / source.split()[0] / request
            run("inference", config_file=[str(CONFIGS / "inference.json")], meta_file=str(CONFIGS / "metadata.json"),
                logging_file=False, ckpt_dir=str(ckpt), ddim_steps=int(ddim_steps), progress=False,
                map_to_source=False, formats=["png"], output_dir=str(samples), datalist=str(copy / "datalist.json"),
                split="test", seed=int(seed), skip_existing=True, **dict(model_overrides or {}),
                lesion_labels=None if request == "own" else f"birads={request}")
            probs[request] = read_back(reader, samples, copy, size, seed)
        ids = sorted(c for c in probs["2"] if all(np.isfinite(probs[r][c]) for r in REQUESTS))
        unread = sorted(set(probs["2"]) - set(ids))
        p2, p5 = np.array([probs["2"][c] for c in ids]), np.array([probs["5"][c] for c in ids])
        own_ok = [(probs["own"][c] >= 0.5) == truth[c] for c in ids if c in truth]
        results["conditions"][source] = {
            "n_lesions": len(ids),
            "not_read": unread,
            "mean_p_malignant": {r: float(np.mean([probs[r][c] for c in ids])) for r in REQUESTS},
            "birads5_above_birads2": float((p5 > p2).mean()),
            "mean_difference_5_minus_2": float((p5 - p2).mean()),
            "accuracy_requested": float(((p2 < 0.5).sum() + (p5 >= 0.5).sum()) / (2 * len(ids))),
            "accuracy_own_label": float(np.mean(own_ok)) if own_ok else None,
            "per_case": {c: {r: probs[r][c] for r in REQUESTS} for c in ids},
        }
    results["pixel_effects"] = pixel_effects(out, out / "prepared" / "own", size, seed, source_prepared=prepared)
    results["context_reach"] = {str(ckpt): model_reach(ckpt, out / "prepared" / "own", out / "prepared" / "neutral",
                                                       model_overrides, seed=seed)}
    for other in reach_ckpt_dirs or ():
        results["context_reach"][str(other)] = model_reach(other, out / "prepared" / "own", out / "prepared" / "neutral",
                                                           seed=seed)
    results["seconds"] = round(time.time() - t0, 1)
    atomic_write_json(out / "lesion_label_study.json", results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prepared_dir", required=True)
    ap.add_argument("--ckpt_dir", required=True, help="a model trained with lesion_label_names including lesion_birads")
    ap.add_argument("--output", required=True)
    ap.add_argument("--ddim_steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max_cases", type=int, default=None)
    ap.add_argument("--reach", nargs="*", default=[], metavar="CKPT_DIR",
                    help="more bundle models whose context reach is measured on the same cases (e.g. bundle/models)")
    ap.add_argument("--lesion_label_mode", default=None, choices=["tokens", "spatial"],
                    help="for a checkpoint whose record predates lesion_label_mode")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    try:
        overrides = {"lesion_label_mode": args.lesion_label_mode} if args.lesion_label_mode else None
        res = run_study(args.prepared_dir, args.ckpt_dir, args.output, args.ddim_steps, args.seed, args.max_cases,
                        overrides, args.reach)
    except MammoInputError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    px = res["pixel_effects"]
    print(f"mean |change| inside the lesion: BI-RADS 5 vs 2 {px['birads_5_vs_2']:.5f}, own vs neutral features "
          f"{px['features_own_vs_neutral']:.5f}; real lesion contrast {px['real_lesion_contrast']:.4f}")
    for name, reach in res["context_reach"].items():
        print(f"context reach of {name}: eps changes {100 * reach['features']:.3f} % with neutral features, "
              f"{100 * reach['context']:.3f} % with the unconditional context")
    r = res["reader"]
    print(f"reader: real held-out accuracy {r['accuracy']:.3f} (n={r['n']}), training {r['train_accuracy']:.3f}")
    for name, c in res["conditions"].items():
        m = c["mean_p_malignant"]
        print(f"{name}: P(malignant) own {m['own']:.3f}, BI-RADS 2 {m['2']:.3f}, BI-RADS 5 {m['5']:.3f}; "
              f"5 > 2 on {c['birads5_above_birads2']:.2f} of {c['n_lesions']} lesions; requested read back "
              f"{c['accuracy_requested']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
