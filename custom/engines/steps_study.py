"""Steps-vs-quality and diversity study: the bundle's evaluation (``evaluate.json``) run once per sampler setting.

``python -m custom.engines.steps_study --prepared_dir P --ckpt_dir M --output_dir O --steps 10 20 25 50
[--settings "eta=1.0" "guidance_scale=1.0"]`` runs the stock evaluation workflow for every DDIM step count (and
every extra setting at ``--base_steps``), with the same seeds, and writes:

- ``O/steps_study.json``: per setting, Mass IoU (with the segmenter's ceiling on the real images), FD-radiomics67, MS-SSIM
  among samples of one condition, the MS-SSIM between *different real* test images (the diversity reference), and
  the seconds the evaluation took;
- ``O/steps_study.md``: the same as a Markdown table;
- ``O/steps_vs_quality.png``: the three metrics against the number of DDIM steps.

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


def real_vs_real_ms_ssim(prepared_dir: str | Path, split: str = "test", max_images: int = 16) -> float | None:
    """Mean MS-SSIM between pairs of *different* real images of ``split`` (the reference for sample diversity)."""
    from PIL import Image

    from custom.data.training import load_prepared_datalist
    from custom.metrics.image_quality import ms_ssim_diversity

    items = load_prepared_datalist(str(prepared_dir), split, max_lesions=2)[:max_images]
    if len(items) < 2:
        return None
    imgs = []
    for it in items:
        with Image.open(it["image"]) as im:
            imgs.append(np.asarray(im, dtype=np.float32) / 65535.0)
    return float(ms_ssim_diversity(np.stack(imgs)[:, None])["ms_ssim_mean"])


def run_setting(name: str, overrides: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from monai.bundle import run

    out = Path(args.output_dir) / name
    t = time.perf_counter()
    run("evaluate", config_file=str(CONFIG), meta_file=str(REPO / "bundle" / "configs" / "metadata.json"),
        logging_file=False, bundle_root=str(REPO / "bundle"), prepared_dir=str(args.prepared_dir),
        ckpt_dir=str(args.ckpt_dir), segmenter_path=str(Path(args.ckpt_dir) / "segmenter.pt"),
        results_dir=str(out), label=name, progress=False, **overrides)
    seconds = time.perf_counter() - t
    metrics_file = next(out.rglob("metrics.json"))
    m = json.loads(metrics_file.read_text())["metrics"]
    return {"setting": name, **overrides, "seconds": round(seconds, 1), "mass_iou": m.get("mass_iou"),
            "ceiling_mass_iou": m.get("ceiling_mass_iou"), "fd_radiomics67": m.get("fd_radiomics67"), "ms_ssim": m.get("ms_ssim"),
            "breast_iou": m.get("breast_iou"), "metrics_file": str(metrics_file)}


def write_outputs(rows: Sequence[dict[str, Any]], reference: float | None, output_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (output_dir / "steps_study.json").write_text(json.dumps({"real_vs_real_ms_ssim": reference, "rows": list(rows)}, indent=2))
    fmt = lambda v: "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| setting | DDIM steps | eta | guidance | Mass IoU (ceiling) | FD-radiomics67 | MS-SSIM same condition | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r.get('ddim_steps')} | {r.get('ddim_eta', 'config')} | "
                     f"{r.get('guidance_scale', 'config')} | {fmt(r['mass_iou'])} ({fmt(r['ceiling_mass_iou'])}) | "
                     f"{fmt(r['fd_radiomics67'])} | {fmt(r['ms_ssim'])} | {r['seconds']} |")
    lines.append(f"\nMS-SSIM between different real test images (diversity reference): {fmt(reference)}\n")
    (output_dir / "steps_study.md").write_text("\n".join(lines))
    curve = sorted((r for r in rows if set(r) >= {"ddim_steps"} and "ddim_eta" not in r and "guidance_scale" not in r),
                   key=lambda r: r["ddim_steps"])
    if not curve:
        return
    steps = [r["ddim_steps"] for r in curve]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, key, title in zip(axes, ("mass_iou", "fd_radiomics67", "ms_ssim"), ("Mass IoU", "FD-radiomics67", "MS-SSIM, same condition")):
        ax.plot(steps, [r[key] if r[key] is not None else np.nan for r in curve], "o-")
        if key == "mass_iou" and curve[0]["ceiling_mass_iou"] is not None:
            ax.axhline(curve[0]["ceiling_mass_iou"], ls="--", c="grey", label="segmenter ceiling (real)")
            ax.legend(fontsize=7)
        if key == "ms_ssim" and reference is not None:
            ax.axhline(reference, ls="--", c="grey", label="real vs real")
            ax.legend(fontsize=7)
        ax.set_xlabel("DDIM steps")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(steps)
    fig.suptitle("Steps vs quality — phantom data, short-trained default model (not the paper's numbers)", fontsize=9)
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
    ap.add_argument("--diversity_cases", type=int, default=3)
    ap.add_argument("--diversity_samples", type=int, default=4)
    args = ap.parse_args(argv)
    for s in args.steps:
        if s < 1:
            ap.error(f"--steps: every value must be >= 1, got {s}")
    extra = [(s, parse_setting(s)) for s in args.settings]  # all checked before any evaluation runs
    for ckpt in ("autoencoder.pt", "model.pt", "segmenter.pt"):
        if not (Path(args.ckpt_dir) / ckpt).is_file():
            ap.error(f"--ckpt_dir: {Path(args.ckpt_dir) / ckpt} not found")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = {"diversity_cases": args.diversity_cases, "diversity_samples": args.diversity_samples}
    rows = [run_setting(f"steps{s}", {"ddim_steps": s, **common}, args) for s in args.steps]
    for text, ov in extra:
        name = "steps{}_{}".format(ov.get("ddim_steps", args.base_steps), text.replace("=", "").replace(",", "_"))
        rows.append(run_setting(name, {"ddim_steps": args.base_steps, **ov, **common}, args))
    reference = real_vs_real_ms_ssim(args.prepared_dir)
    write_outputs(rows, reference, out)
    print((out / "steps_study.md").read_text())
    return {"rows": rows, "real_vs_real_ms_ssim": reference}


if __name__ == "__main__":
    main()
