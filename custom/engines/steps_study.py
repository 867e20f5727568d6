"""Steps-vs-quality and diversity study: the bundle's evaluation (``evaluate.json``) run once per sampler setting.

``python -m custom.engines.steps_study --prepared_dir P --ckpt_dir M --output_dir O --steps 10 20 25 50
[--settings "eta=1.0" "guidance_scale=1.0"] [--pndm_steps 10 20 50]`` runs the stock evaluation workflow for every
DDIM step count (and every extra setting at ``--base_steps``, and MONAI's PNDM sampler, ``--sampler pndm``, at every
``--pndm_steps`` count), with the same seeds, and writes:

- ``O/steps_study.json``: per setting, Mass IoU (with the segmenter's ceiling on the real images), FD-radiomics67, MS-SSIM
  among samples of one condition, the MS-SSIM between *different real* test images (the diversity reference), and
  the seconds the evaluation took;
- ``O/steps_study.md``: the same as a Markdown table;
- ``O/steps_vs_quality.png``: the three metrics against the number of steps (DDIM, and PNDM when run).

Each setting is an ordinary ``evaluate`` run (``O/<setting>/...``), so every number is reproducible with the
corresponding ``python -m monai.bundle run evaluate`` line. Nothing here trains: point it at a trained model.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "bundle" / "configs" / "evaluate.json"


def parse_setting(text: str) -> dict[str, Any]:
    """``"eta=1.0,guidance_scale=1"`` -> ``{"ddim_eta": 1.0, "guidance_scale": 1.0}``."""
    names = {"eta": "ddim_eta", "guidance_scale": "guidance_scale", "guidance": "guidance_scale", "steps": "ddim_steps"}
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ValueError(f"--settings: expected name=value, got {part!r}")
        key, value = (s.strip() for s in part.split("=", 1))
        if key not in names:
            raise ValueError(f"--settings: unknown name {key!r} (one of {sorted(names)})")
        out[names[key]] = int(value) if names[key] == "ddim_steps" else float(value)
    return out


def stage1_roundtrip(ckpt_dir: str | Path):
    """``x -> decode(encode(x))`` through the model folder's stage-1 autoencoder (built from ``common.json`` and the
    checkpoint's own record, checksum-verified)."""
    from monai.bundle import ConfigParser

    from custom.checkpoints import load_checkpoint
    from custom.engines.diffusion import FrozenLatentEncoder

    path = Path(ckpt_dir) / "autoencoder.pt"
    record = load_checkpoint(path, "cpu", what="stage-1 checkpoint").get("model_config")
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundle" / "configs" / "common.json"))
    if record:
        parser.update(json.loads(record))
    encoder = FrozenLatentEncoder(parser.get_parsed_content("autoencoder_def"), path)
    return lambda x: encoder.decode(encoder.encode(x))


def diversity_references(prepared_dir: str | Path, image_size: int, siblings: bool = True,
                         n_cases: int = 3, n_siblings: int = 4, roundtrip=None) -> dict[str, Any]:
    """The diversity references at the model's ``image_size`` (:mod:`custom.metrics.diversity_reference`):
    different real test images, (phantom only) texture siblings = real images of one condition, and those
    siblings after the stage-1 round trip (``roundtrip``) = the most diversity stage 2 can show."""
    from custom.metrics.diversity_reference import real_pairs_ms_ssim, texture_sibling_ms_ssim

    out: dict[str, Any] = {"image_size": int(image_size)}
    try:
        out["real_pairs_ms_ssim"] = real_pairs_ms_ssim(prepared_dir, image_size)["ms_ssim_mean"]
    except ValueError:
        out["real_pairs_ms_ssim"] = None
    out["texture_siblings_ms_ssim"] = out["stage1_siblings_ms_ssim"] = None
    if siblings:
        try:
            ref = texture_sibling_ms_ssim(prepared_dir, image_size, n_cases=n_cases, n_siblings=n_siblings,
                                          roundtrip=roundtrip)
        except ValueError:  # not phantom data
            return out
        out["texture_siblings_ms_ssim"] = ref["ms_ssim_mean"]
        out["stage1_siblings_ms_ssim"] = ref.get("roundtrip_ms_ssim_mean")
    return out


def model_image_size(ckpt_dir: str | Path) -> int:
    """The model's image side from ``diffusion_info.json`` (written by stage-2 training)."""
    info = Path(ckpt_dir) / "diffusion_info.json"
    try:
        return int(json.loads(info.read_text())["image_size"])
    except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"{info}: no image_size ({err})") from None


def run_setting(name: str, overrides: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from monai.bundle import run

    out = Path(args.output_dir) / name
    t = time.perf_counter()
    run("evaluate", config_file=str(CONFIG), meta_file=str(REPO / "bundle" / "configs" / "metadata.json"),
        logging_file=False, bundle_root=str(REPO / "bundle"), prepared_dir=str(args.prepared_dir),
        ckpt_dir=str(args.ckpt_dir), segmenter_path=str(Path(args.ckpt_dir) / "segmenter.pt"),
        results_dir=str(out), label=name, progress=False, published_frd=True, **overrides)
    seconds = time.perf_counter() - t
    metrics_file = next(out.rglob("metrics.json"))
    m = json.loads(metrics_file.read_text())["metrics"]
    return {"setting": name, **overrides, "seconds": round(seconds, 1), "mass_iou": m.get("mass_iou"),
            "ceiling_mass_iou": m.get("ceiling_mass_iou"), "fd_radiomics67": m.get("fd_radiomics67"),
            "floor_fd_radiomics67": m.get("floor_fd_radiomics67"), "frd": m.get("frd"), "floor_frd": m.get("floor_frd"),
            "feature_distance": m.get("feature_distance"), "feature_distance_name": m.get("feature_distance_name"),
            "ms_ssim": m.get("ms_ssim"),
            "breast_iou": m.get("breast_iou"), "metrics_file": str(metrics_file)}


def write_outputs(rows: Sequence[dict[str, Any]], references: dict[str, Any], output_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = references.get("real_pairs_ms_ssim")
    siblings = references.get("texture_siblings_ms_ssim")
    (output_dir / "steps_study.json").write_text(json.dumps({"references": references, "rows": list(rows)}, indent=2))
    fmt = lambda v: "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| setting | sampler | steps | eta | guidance | Mass IoU (ceiling) | FD-radiomics67 (floor) | published FRD (floor) "
             "| FSD/FID | MS-SSIM same condition | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        pndm = r.get("sampler") == "pndm"
        lines.append(f"| {r['setting']} | {r.get('sampler', 'ddim')} | {r.get('ddim_steps')} | "
                     f"{'n/a' if pndm else r.get('ddim_eta', 'config')} | "
                     f"{r.get('guidance_scale', 'config')} | {fmt(r['mass_iou'])} ({fmt(r['ceiling_mass_iou'])}) | "
                     f"{fmt(r['fd_radiomics67'])} ({fmt(r.get('floor_fd_radiomics67'))}) | {fmt(r.get('frd'))} "
                     f"({fmt(r.get('floor_frd'))}) | {fmt(r.get('feature_distance'))} | {fmt(r['ms_ssim'])} | {r['seconds']} |")
    lines.append(f"\nDiversity references at {references.get('image_size')} px: MS-SSIM between different real test "
                 f"images {fmt(reference)}; among real images of one condition (phantom texture siblings) "
                 f"{fmt(siblings)}; the same siblings after the stage-1 round trip (the most any sampler can show) "
                 f"{fmt(references.get('stage1_siblings_ms_ssim'))}\n")
    (output_dir / "steps_study.md").write_text("\n".join(lines))
    def plain(r: dict[str, Any], sampler: str) -> bool:
        return ("ddim_steps" in r and "ddim_eta" not in r and "guidance_scale" not in r
                and r.get("sampler", "ddim") == sampler)

    curves = {name: sorted((r for r in rows if plain(r, name)), key=lambda r: r["ddim_steps"]) for name in ("ddim", "pndm")}
    curve = curves["ddim"] or curves["pndm"]
    if not curve:
        return
    steps = sorted({r["ddim_steps"] for c in curves.values() for r in c})
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, key, title in zip(axes, ("mass_iou", "fd_radiomics67", "ms_ssim"), ("Mass IoU", "FD-radiomics67", "MS-SSIM, same condition")):
        for name, marker in (("ddim", "o-"), ("pndm", "s--")):
            if curves[name]:
                ax.plot([r["ddim_steps"] for r in curves[name]],
                        [r[key] if r[key] is not None else np.nan for r in curves[name]], marker, label=name.upper())
        if key == "mass_iou" and curve[0]["ceiling_mass_iou"] is not None:
            ax.axhline(curve[0]["ceiling_mass_iou"], ls="--", c="grey", label="segmenter ceiling (real)")
            ax.legend(fontsize=7)
        if key == "ms_ssim" and reference is not None:
            ax.axhline(reference, ls="--", c="grey", label="different real images")
            ax.legend(fontsize=7)
        if key == "ms_ssim" and siblings is not None:
            ax.axhline(siblings, ls=":", c="k", label="real, one condition (siblings)")
            ax.legend(fontsize=7)
        ax.legend(fontsize=7)
        ax.set_xlabel("sampler steps")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(steps)
    fig.suptitle("Steps vs quality — phantom data (not the paper's numbers)", fontsize=9)
    fig.tight_layout()
    fig.savefig(output_dir / "steps_vs_quality.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared_dir", required=True)
    ap.add_argument("--ckpt_dir", required=True, help="folder with autoencoder.pt, model.pt, segmenter.pt")
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--steps", type=int, nargs="*", default=[10, 20, 25, 50])
    ap.add_argument("--settings", nargs="*", default=[], help='extra settings at --base_steps, e.g. "eta=1.0"')
    ap.add_argument("--base_steps", type=int, default=20)
    ap.add_argument("--pndm_steps", type=int, nargs="*", default=[],
                    help="also run MONAI's PNDM sampler (--sampler pndm, default guidance) at these step counts")
    ap.add_argument("--diversity_cases", type=int, default=3)
    ap.add_argument("--diversity_samples", type=int, default=4)
    ap.add_argument("--no_siblings", action="store_true", help="skip the phantom texture-sibling reference")
    args = ap.parse_args(argv)
    for flag, values in (("--steps", args.steps), ("--pndm_steps", args.pndm_steps)):
        for s in values:
            if s < 1:
                ap.error(f"{flag}: every value must be >= 1, got {s}")
    extra = [(s, parse_setting(s)) for s in args.settings]  # all checked before any evaluation runs
    for ckpt in ("autoencoder.pt", "model.pt", "segmenter.pt"):
        if not (Path(args.ckpt_dir) / ckpt).is_file():
            ap.error(f"--ckpt_dir: {Path(args.ckpt_dir) / ckpt} not found")
    try:
        image_size = model_image_size(args.ckpt_dir)
    except ValueError as err:
        ap.error(f"--ckpt_dir: {err}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = {"diversity_cases": args.diversity_cases, "diversity_samples": args.diversity_samples}
    rows = [run_setting(f"steps{s}", {"ddim_steps": s, **common}, args) for s in args.steps]
    for text, ov in extra:
        name = "steps{}_{}".format(ov.get("ddim_steps", args.base_steps), text.replace("=", "").replace(",", "_"))
        rows.append(run_setting(name, {"ddim_steps": args.base_steps, **ov, **common}, args))
    rows += [run_setting(f"pndm{s}", {"sampler": "pndm", "ddim_steps": s, **common}, args) for s in args.pndm_steps]
    references = diversity_references(args.prepared_dir, image_size, siblings=not args.no_siblings,
                                      n_cases=args.diversity_cases, n_siblings=args.diversity_samples,
                                      roundtrip=stage1_roundtrip(args.ckpt_dir))
    write_outputs(rows, references, out)
    print((out / "steps_study.md").read_text())
    return {"rows": rows, "references": references}


if __name__ == "__main__":
    main()
