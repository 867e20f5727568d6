"""Figures for the docs from a training run: ``python -m custom.engines.figures --runs runs --output bundle/docs/images``.

Reads the loss-curve CSVs the training handlers write (``runs/autoencoder/loss_curve.csv``,
``runs/diffusion/losses.csv``) and plots them (``loss_curves.png``); copies the latest stage-2 sample grid
(``runs/diffusion/samples/*.png``) to ``sample_grid.png``, the latest stage-1 reconstruction grid to
``reconstruction_grid.png`` and the latest evaluation figure grid to ``evaluation_grid.png``. With
``--diversity_eval EVAL_DIR --prepared_dir P`` it also draws ``diversity_grid.png`` (:func:`diversity_figure`); with
``--cohort DIR`` (a ``synthesize`` output folder) ``synthetic_cohort.png`` (:func:`cohort_figure`); with
``--density_studies DIR[=label] ...`` (``edit_study`` output folders) ``density_control.png`` (:func:`density_figure`);
with ``--lesion_label_study DIR`` ``lesion_labels.png`` (:func:`lesion_label_figure`).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from custom.io import atomic_path


def _read(path: Path, x: str, ys: list[str]) -> dict[str, tuple[list[float], list[float]]]:
    out: dict[str, tuple[list[float], list[float]]] = {y: ([], []) for y in ys}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for y in ys:
                if row.get(y) not in (None, ""):
                    out[y][0].append(float(row[x]))
                    out[y][1].append(float(row[y]))
    return out


def plot_loss_curves(runs: Path, output: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("stage 1: autoencoder (L1 + KL)", runs / "autoencoder" / "loss_curve.csv", ["train_loss", "val_loss"]),
        ("stage 2: latent diffusion (train: target MSE, val: noise MSE)", runs / "diffusion" / "losses.csv", ["train_loss", "val_loss"]),
    ]
    panels = [p for p in panels if p[1].is_file()]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.4), squeeze=False)
    for ax, (title, path, ys) in zip(axes[0], panels):
        series = _read(path, "iteration", ys)
        for y, (xs, vs) in series.items():
            if xs:
                ax.plot(xs, vs, label=y.replace("_", " "), marker="o" if y.startswith("val") else None,
                        markersize=3, linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("phantom (synthetic) data, CPU default config", fontsize=9)
    fig.tight_layout()
    target = output / "loss_curves.png"
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return target


def _latest(folder: Path, pattern: str = "*.png") -> Path | None:
    files = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return files[-1] if files else None


def _save(fig: Any, output: str | Path) -> Path:
    """Lay out, write (atomically, PNG at 110 dpi, parent folders made) and close a figure; returns its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    target = Path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return target


def diversity_figure(eval_dir: str | Path, prepared_dir: str | Path, output: str | Path, n_cases: int = 2,
                     title: str = "") -> Path:
    """Samples of one condition next to real images of that condition.

    One row per diversity condition of an ``evaluate`` run (cases with several seeds in ``eval_dir/generated``,
    files ``<case>_seed<k>.png``): the conditioning label map | the generated seeds | phantom *texture siblings* of
    the case's real image (same breast, lesions and tags, independent parenchyma:
    :func:`custom.metrics.diversity_reference.sibling_frames`), with each row's mean pairwise MS-SSIM in the
    titles. Phantom data only (siblings need the phantom generator)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from custom.metrics.diversity_reference import sibling_frames
    from custom.metrics.image_quality import ms_ssim_diversity

    gen_dir = Path(eval_dir) / "generated"
    seeds: dict[str, list[Path]] = {}
    for f in sorted(gen_dir.glob("*_seed*.png")):
        case, _, k = f.stem.rpartition("_seed")
        if k.isdigit():
            seeds.setdefault(case, []).append(f)
    conditions = [(c, fs) for c, fs in seeds.items() if len(fs) >= 2][: int(n_cases)]
    if not conditions:
        raise ValueError(f"{gen_dir}: no condition with two or more seeds (run evaluate with diversity_samples >= 2)")
    datalist = json.loads((Path(prepared_dir) / "datalist.json").read_text())
    records = {r["case_id"]: r for split in ("training", "validation", "test") for r in datalist.get(split, [])}
    n_seeds = max(len(fs) for _, fs in conditions)
    fig, axes = plt.subplots(len(conditions), 1 + 2 * n_seeds, figsize=(1.6 * (1 + 2 * n_seeds), 1.8 * len(conditions)),
                             squeeze=False)
    for row, (case, files) in enumerate(conditions):
        gen = np.stack([np.asarray(Image.open(f), dtype=np.float32) / 65535.0 for f in files])
        size = gen.shape[-1]
        rec = records.get(case)
        if rec is None:
            raise ValueError(f"{prepared_dir}: case {case!r} of {eval_dir} is not in the datalist")
        sib = sibling_frames(rec, list(range(len(files))), size)[:, 0]
        label = np.asarray(Image.open(Path(prepared_dir) / rec["label"]).resize((size, size), Image.NEAREST))
        m_gen = ms_ssim_diversity(gen[:, None])["ms_ssim_mean"]
        m_sib = ms_ssim_diversity(sib[:, None])["ms_ssim_mean"]
        axes[row, 0].imshow(label, cmap="viridis", vmin=0, vmax=2)
        axes[row, 0].set_title("condition", fontsize=7)
        for k in range(n_seeds):
            for col, imgs, name, m in ((1 + k, gen, "generated", m_gen), (1 + n_seeds + k, sib, "real sibling", m_sib)):
                ax = axes[row, col]
                if k < len(imgs):
                    ax.imshow(imgs[k], cmap="gray", vmin=0, vmax=1)
                    ax.set_title(f"{name} {k}" + (f"\nMS-SSIM {m:.2f}" if k == 0 else ""), fontsize=7)
        for ax in axes[row]:
            ax.axis("off")
    fig.suptitle(title or "Samples of one condition (seeds) vs real phantom images of that condition (texture siblings)",
                 fontsize=9)
    return _save(fig, output)


def cohort_figure(cohort_dir: str | Path, output: str | Path, n_images: int = 16, columns: int = 8) -> Path:
    """The first ``n_images`` images of a synthetic cohort (``synthesize`` output: ``datalist.json`` + ``images/`` +
    ``labels/``), each with the outline of its breast condition (cyan) and of its lesion condition (red), and its
    lesion count and malignancy in the title; the cohort's model (SHA-256 prefix, from ``synthesis.json``) in the
    figure title.

    Raises:
        ValueError: no ``datalist.json`` or no image in it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    root = Path(cohort_dir)
    try:
        datalist = json.loads((root / "datalist.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{root / 'datalist.json'}: not a synthetic cohort's datalist ({err})") from None
    records = [r for split in ("training", "validation", "test") for r in datalist.get(split, [])][: int(n_images)]
    if not records:
        raise ValueError(f"{root / 'datalist.json'}: no image")
    try:
        model = json.loads((root / "synthesis.json").read_text())["identity"]["model_sha256"][:12]
    except (OSError, ValueError, KeyError, TypeError):
        model = "unknown model"
    cols = min(int(columns), len(records))
    rows = -(-len(records) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.95 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, rec in zip(axes.ravel(), records):
        with Image.open(root / rec["image"]) as im:
            image = np.asarray(im, dtype=np.float32) / float(np.iinfo(np.asarray(im).dtype).max)
        with Image.open(root / rec["label"]) as im:
            label = np.asarray(im)
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        if (label >= 1).any():
            ax.contour(label >= 1, levels=[0.5], colors="cyan", linewidths=0.5)
        if (label == 2).any():
            ax.contour(label == 2, levels=[0.5], colors="red", linewidths=0.6)
        n = int(rec.get("num_lesions", 0))
        ax.set_title(f"{n} lesion{'s' if n != 1 else ''}" + (f", {rec['malignancy']}" if n and rec.get("malignancy") else ""),
                     fontsize=7)
    fig.suptitle(f"Synthetic cohort (model {model}): cyan = breast condition, red = lesion condition", fontsize=9)
    return _save(fig, output)


def density_figure(studies: list[tuple[str | Path, str]], output: str | Path, n_masks: int = 2) -> Path:
    """Density control with a breast mask, side by side for several edit studies (e.g. attribute tokens vs the
    time-embedding mode): for each study (``(folder, label)``) and each of its first ``n_masks`` masks, one row of the
    healthy images generated at density A, B, C, D (``samples/density_masks``), each titled with its dense-tissue
    fraction and the reader's class, the row titled with the real image's density and fraction.

    Raises:
        ValueError: a folder without the study's ``results.json`` or without the density-with-mask check.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = []
    for folder, label in studies:
        root = Path(folder)
        try:
            res = json.loads((root / "results.json").read_text())
            per_case = res["attribute_fidelity"]["density_with_mask"]["per_case"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{root}: not an edit study with the density-with-mask check ({err!r})") from None
        cases: dict[str, list[dict]] = {}
        for r in per_case:
            cases.setdefault(r["case_id"], []).append(r)
        for case_id, rs in list(cases.items())[: int(n_masks)]:
            rows.append((root, label, case_id, rs))
    if not rows:
        raise ValueError("density_figure: no mask in the given studies")
    cols = max(len(r[3]) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.7 * cols, 1.95 * len(rows)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, (root, label, case_id, rs) in enumerate(rows):
        for j, r in enumerate(rs):
            path = root / "samples" / "density_masks" / f"d_{case_id[:12]}_{r['requested']}_seed0.png"
            with Image.open(path) as im:
                image = np.asarray(im, dtype=np.float32) / 65535.0
            ax = axes[i, j]
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"asked {r['requested']}: {r['fraction']:.2f} -> {r['read']}", fontsize=7)
        axes[i, 0].text(-0.08, 0.5, f"{label}\nreal {rs[0]['real_density']} ({rs[0]['real_fraction']:.2f})", fontsize=7,
                        rotation=90, va="center", ha="right", transform=axes[i, 0].transAxes)
    fig.suptitle("Density asked for with a breast mask: dense-tissue fraction -> class read "
                 "(phantom; reader thresholds 0.20 / 0.35 / 0.50)", fontsize=8)
    return _save(fig, output)


def lesion_label_figure(study_dir: str | Path, output: str | Path, n_cases: int = 4, margin: int = 6) -> Path:
    """Per-lesion BI-RADS asked for (:mod:`custom.workflows.lesion_label_study`): for the first ``n_cases`` test lesions
    one row of crops around lesion 0 - the real lesion, then the samples generated at BI-RADS 2 and 5 with the
    lesion's own features and with the neutral features (same mask, same seed) - each titled with the reader's
    probability of "malignant-looking".

    Raises:
        ValueError: a folder without the study's ``lesion_label_study.json``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from custom.data.training import model_frame, prepared_transforms

    root = Path(study_dir)
    try:
        res = json.loads((root / "lesion_label_study.json").read_text())
        conds = res["conditions"]
        size, seed = int(res["settings"]["image_size"]), int(res["settings"]["seed"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{root}: not a lesion-label study ({err!r})") from None
    prepared = root / "prepared" / "own"
    entries = {e["case_id"]: e for e in json.loads((prepared / "datalist.json").read_text())["test"]}
    ids = [c for c in conds["own features"]["per_case"] if c in entries and c in conds["neutral features"]["per_case"]]
    ids = ids[: int(n_cases)]
    if not ids:
        raise ValueError(f"{root}: no case to draw")
    xf = prepared_transforms(image_size=size, max_lesions=8)
    columns = [("real", None, None)] + [(f"{src.split()[0]} f., BI-RADS {r}", src, r)
                                        for src in ("own features", "neutral features") for r in ("2", "5")]
    fig, axes = plt.subplots(len(ids), len(columns), figsize=(1.6 * len(columns), 1.75 * len(ids)), squeeze=False)
    for i, cid in enumerate(ids):
        e = entries[cid]
        item = model_frame(xf, prepared, e)
        mask = item["lesion_masks"][0].numpy() > 0
        rows, cols = np.nonzero(mask)
        r0, r1 = max(0, rows.min() - margin), min(size, rows.max() + margin + 1)
        c0, c1 = max(0, cols.min() - margin), min(size, cols.max() + margin + 1)
        for j, (title, src, request) in enumerate(columns):
            ax = axes[i, j]
            ax.axis("off")
            if src is None:
                image = item["image"][0].numpy()
                birads = next((f.get("birads") for f in e.get("findings", []) if int(f.get("lesion_index", 0)) == 0), "")
                ax.set_title(f"real ({birads})", fontsize=7)
            else:
                with Image.open(root / src.split()[0] / request / f"{cid}_seed{seed}.png") as im:
                    image = np.asarray(im, dtype=np.float32) / 65535.0
                p = conds[src]["per_case"][cid][request]
                ax.set_title(f"{title}\nP(mal.) {p:.2f}", fontsize=6)
            ax.imshow(image[r0:r1, c0:c1], cmap="gray", vmin=0, vmax=1)
            ax.contour(mask[r0:r1, c0:c1], levels=[0.5], colors="y", linewidths=0.4)
    fig.suptitle("Per-lesion BI-RADS asked for (phantom; same mask and seed per row; yellow: the lesion mask)",
                 fontsize=8)
    return _save(fig, output)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--output", default="bundle/docs/images")
    ap.add_argument("--diversity_eval", default=None,
                    help="an evaluate output folder: also write diversity_grid.png (needs --prepared_dir; phantom only)")
    ap.add_argument("--prepared_dir", default=None)
    ap.add_argument("--cohort", default=None, help="a synthesize output folder: also write synthetic_cohort.png")
    ap.add_argument("--density_studies", nargs="+", default=None, metavar="DIR[=label]",
                    help="edit_study output folders: also write density_control.png (one row per study and mask)")
    ap.add_argument("--lesion_label_study", default=None,
                    help="a lesion_label_study output folder: also write lesion_labels.png")
    args = ap.parse_args(argv)
    if args.diversity_eval and not args.prepared_dir:
        ap.error("--diversity_eval needs --prepared_dir")
    runs, output = Path(args.runs), Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    written = [plot_loss_curves(runs, output)]
    if args.diversity_eval:
        written.append(diversity_figure(args.diversity_eval, args.prepared_dir, output / "diversity_grid.png"))
    if args.cohort:
        written.append(cohort_figure(args.cohort, output / "synthetic_cohort.png"))
    if args.density_studies:
        studies = [(d.partition("=")[0], d.partition("=")[2] or Path(d).name) for d in args.density_studies]
        written.append(density_figure(studies, output / "density_control.png"))
    if args.lesion_label_study:
        written.append(lesion_label_figure(args.lesion_label_study, output / "lesion_labels.png"))
    evaluation = sorted((runs / "evaluation").glob("*/figure_grid.png"), key=lambda p: p.stat().st_mtime)
    for src, name in ((_latest(runs / "diffusion" / "samples"), "sample_grid.png"),
                      (runs / "autoencoder" / "reconstruction_latest.png", "reconstruction_grid.png"),
                      (evaluation[-1] if evaluation else None, "evaluation_grid.png")):
        if src is not None and src.is_file():
            with atomic_path(output / name) as tmp:
                shutil.copyfile(src, tmp)
            written.append(output / name)
    for p in written:
        if p is not None:
            print(p)


if __name__ == "__main__":
    main()
