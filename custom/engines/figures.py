"""Figures for the docs from a training run: ``python -m custom.engines.figures --runs runs --output bundle/docs/images``.

Reads the loss-curve CSVs the training handlers write (``runs/autoencoder/loss_curve.csv``,
``runs/diffusion/losses.csv``) and plots them (``loss_curves.png``); copies the latest stage-2 sample grid
(``runs/diffusion/samples/*.png``) to ``sample_grid.png``, the latest stage-1 reconstruction grid to
``reconstruction_grid.png`` and the latest evaluation figure grid to ``evaluation_grid.png``.
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--output", default="bundle/docs/images")
    args = ap.parse_args(argv)
    runs, output = Path(args.runs), Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    written = [plot_loss_curves(runs, output)]
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
