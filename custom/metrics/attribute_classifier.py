"""The reconstruction loop's attribute classifier (GBCI): a small CNN trained on real (phantom) images that predicts
density (A-D), view (CC/MLO) and whether a lesion is present, used to check that generated images show the attributes
they were asked for.

* :class:`AttributeClassifier`: ``(B, 1, S, S)`` in [0, 1] -> one logit vector per head.
* :func:`train_attribute_classifier`: fit on prepared items (``image`` path + attributes from the datalist).
* :func:`predict_attributes`: images -> ``[{"density": "C", "view": "MLO", "lesion": "yes"}, ...]``.
* :func:`attribute_fidelity`: accuracy per attribute on generated images (against the requested attributes) next to
  the accuracy on real images (the ceiling), via :func:`custom.metrics.fidelity.attribute_accuracy`.
* :func:`save_classifier` / :func:`load_classifier`: ``{"state_dict", "config"}`` loaded with ``weights_only=True``.
* :class:`DensityReader`: a second, classical density check that needs no training beyond three thresholds - the
  dense-tissue fraction of the breast (Otsu's threshold between fat and glandular tissue inside the breast mask),
  cut into A-D at the midpoints between the class medians of the training images.

CLI (phantom/prepared data)::

    python -m custom.metrics.attribute_classifier train --prepared_dir data/prepared --output bundle/models/attribute_classifier.pt
    python -m custom.metrics.attribute_classifier evaluate --classifier bundle/models/attribute_classifier.pt \\
        --prepared_dir data/prepared --generated_dir runs/inference

``evaluate`` reads the requested attributes from each generated sample's JSON sidecar (``parameters.attributes``) and
its PNG; the real ceiling is the test split of ``prepared_dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from custom.data.attributes import attributes_from_entry
from custom.errors import MammoInputError
from custom.io import atomic_path
from custom.metrics.fidelity import attribute_accuracy

__all__ = ["HEADS", "AttributeClassifier", "DensityReader", "MalignancyReader", "dense_fraction", "load_images", "items_from_prepared", "train_attribute_classifier",
           "predict_attributes", "attribute_fidelity", "save_classifier", "load_classifier", "main"]

#: head -> class names.
HEADS: dict[str, tuple[str, ...]] = {"density": ("A", "B", "C", "D"), "view": ("CC", "MLO"), "lesion": ("no", "yes")}


class AttributeClassifier(nn.Module):
    """Conv-BN-ReLU-pool blocks, global average pooling, one linear head per attribute.

    Args:
        image_size: input side ``S`` (images are resized to it by :func:`load_images`).
        channels: output channels of the blocks.
        heads: names of the heads (keys of :data:`HEADS`).
    """

    def __init__(self, image_size: int = 64, channels: Sequence[int] = (8, 16, 32),
                 heads: Sequence[str] = tuple(HEADS)) -> None:
        super().__init__()
        unknown = [h for h in heads if h not in HEADS]
        if unknown:
            raise ValueError(f"AttributeClassifier: unknown heads {unknown} (known: {list(HEADS)})")
        self.config = {"image_size": int(image_size), "channels": [int(c) for c in channels], "heads": list(heads)}
        layers: list[nn.Module] = []
        c_in = 1
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({h: nn.Linear(c_in, len(HEADS[h])) for h in heads})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x.float())
        return {h: head(f) for h, head in self.heads.items()}


def load_images(paths: Sequence[str | os.PathLike], image_size: int) -> torch.Tensor:
    """8/16-bit grayscale PNGs -> ``(N, 1, S, S)`` float in [0, 1] (area resize)."""
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            arr = np.asarray(im)
        if arr.ndim != 2:
            raise MammoInputError(p, f"grayscale PNG expected, got shape {arr.shape}")
        t = torch.from_numpy(arr.astype(np.float32) / float(np.iinfo(arr.dtype).max))[None, None]
        out.append(nn.functional.interpolate(t, size=(image_size, image_size), mode="area")[0])
    return torch.stack(out) if out else torch.zeros(0, 1, image_size, image_size)


def items_from_prepared(prepared_dir: str | os.PathLike, split: str) -> list[dict[str, Any]]:
    """``[{"image": path, "attributes": {"density", "view", "lesion"}}]`` of a prepared split (attributes that the
    datalist does not give are left out)."""
    root = Path(prepared_dir)
    try:
        entries = json.loads((root / "datalist.json").read_text()).get(split, [])
    except (OSError, ValueError) as err:
        raise MammoInputError(root / "datalist.json", f"unreadable datalist ({err})") from None
    items = []
    for e in entries:
        a = attributes_from_entry({k: v for k, v in e.items() if k not in ("label", "source_image")})
        attrs = {k: a[k] for k in ("density", "view") if k in a}
        attrs["lesion"] = "yes" if int(e.get("num_lesions", 0)) > 0 else "no"
        items.append({"image": str(root / e["image"]), "attributes": attrs})
    return items


def _targets(attrs: Sequence[Mapping[str, str]], heads: Sequence[str]) -> dict[str, torch.Tensor]:
    return {h: torch.tensor([HEADS[h].index(a[h]) if h in a else -100 for a in attrs]) for h in heads}


def train_attribute_classifier(images: torch.Tensor, attrs: Sequence[Mapping[str, str]], epochs: int = 30,
                               batch_size: int = 16, lr: float = 3e-3, seed: int = 0,
                               channels: Sequence[int] = (8, 16, 32)) -> AttributeClassifier:
    """Fit a classifier on ``images`` ``(N, 1, S, S)`` with their attributes (a missing attribute is ignored by its
    head's cross-entropy). Random horizontal flips are *not* used: laterality is normalised by ``prepare`` and view
    cues (pectoral muscle corner) are side-specific."""
    torch.manual_seed(int(seed))
    model = AttributeClassifier(images.shape[-1], channels)
    heads = list(model.heads)
    targets = _targets(attrs, heads)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    n = images.shape[0]
    model.train()
    for _ in range(int(epochs)):
        order = torch.randperm(n)
        for i in range(0, n, int(batch_size)):
            idx = order[i:i + int(batch_size)]
            if idx.numel() < 2:
                continue
            out = model(images[idx])
            loss = sum(loss_fn(out[h], targets[h][idx]) for h in heads if (targets[h][idx] >= 0).any())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def predict_attributes(model: AttributeClassifier, images: torch.Tensor) -> list[dict[str, str]]:
    """Predicted attributes of ``(N, 1, S, S)`` images (resized to the model's size)."""
    model.eval()
    size = int(model.config["image_size"])
    if images.shape[-1] != size or images.shape[-2] != size:
        images = nn.functional.interpolate(images.float(), size=(size, size), mode="area")
    out = model(images)
    idx = {h: v.argmax(1).tolist() for h, v in out.items()}
    return [{h: HEADS[h][idx[h][i]] for h in idx} for i in range(images.shape[0])]


def attribute_fidelity(model: AttributeClassifier, generated: torch.Tensor, requested: Sequence[Mapping[str, str]],
                       real: torch.Tensor, real_attrs: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """``{"generated": accuracy per attribute on generated images vs requested, "real": the same on real images vs
    their labels (the ceiling)}``."""
    return {"generated": attribute_accuracy(requested, predict_attributes(model, generated)),
            "real": attribute_accuracy(real_attrs, predict_attributes(model, real))}


def dense_fraction(image: Any, breast: Any = None) -> float:
    """Fraction of the breast that is dense (glandular) tissue: the pixels of the breast above Otsu's threshold of the
    breast's own intensities (fat dark, glandular tissue bright; per image, so a vendor's grey level does not matter).

    Args:
        image: ``(H, W)`` (or ``(1, H, W)``) display image in [0, 1], 0 = air.
        breast: ``(H, W)`` bool breast mask; ``None`` finds it with :func:`custom.transforms.masks.breast_mask`.

    Returns:
        the fraction in [0, 1]; ``nan`` when the breast has fewer than 2 distinct values.
    """
    from skimage.filters import threshold_otsu

    from custom.transforms.masks import breast_mask

    img = np.asarray(image, dtype=np.float64)
    img = img[0] if img.ndim == 3 and img.shape[0] == 1 else img
    if img.ndim != 2:
        raise ValueError(f"dense_fraction: (H, W) image expected, got shape {img.shape}")
    mask = breast_mask(img) if breast is None else np.asarray(breast, dtype=bool)
    values = img[mask]
    if values.size < 2 or np.ptp(values) == 0:
        return float("nan")
    return float((values > threshold_otsu(values)).mean())


class DensityReader:
    """BI-RADS density A-D from the dense-tissue fraction (:func:`dense_fraction`): three thresholds, each the midpoint
    between the medians of two neighbouring classes on real (training) images. A classical, inspectable check beside
    the CNN (:class:`AttributeClassifier`), whose density head is at chance on the small phantom training set.

    Args:
        thresholds: the three cut points (A|B, B|C, C|D), increasing.
    """

    classes = HEADS["density"]

    def __init__(self, thresholds: Sequence[float]) -> None:
        t = [float(v) for v in thresholds]
        if len(t) != len(self.classes) - 1 or any(not np.isfinite(v) for v in t) or t != sorted(t):
            raise ValueError(f"DensityReader: {len(self.classes) - 1} increasing finite thresholds expected, got {thresholds!r}")
        self.thresholds = t

    @classmethod
    def fit(cls, fractions: Sequence[float], densities: Sequence[str]) -> "DensityReader":
        """Thresholds from real images' dense fractions and their density labels (every class needs an image)."""
        fr = np.asarray(fractions, dtype=np.float64)
        labels = list(densities)
        if fr.shape != (len(labels),):
            raise ValueError(f"DensityReader.fit: {fr.shape[0] if fr.ndim else 0} fractions for {len(labels)} labels")
        medians = []
        for c in cls.classes:
            values = fr[[lab == c for lab in labels]]
            values = values[np.isfinite(values)]
            if values.size == 0:
                raise ValueError(f"DensityReader.fit: no image of density {c}")
            medians.append(float(np.median(values)))
        if medians != sorted(medians):
            raise ValueError(f"DensityReader.fit: class medians not increasing A->D ({medians}): the dense fraction "
                             "does not order these images by density")
        return cls([(a + b) / 2.0 for a, b in zip(medians[:-1], medians[1:])])

    @classmethod
    def fit_prepared(cls, prepared_dir: str | os.PathLike, image_size: int) -> tuple["DensityReader", int]:
        """:meth:`fit` on the training split of a prepared folder, its images read at ``image_size`` (the model's):
        returns the reader and the number of training images it read (those without a density label are ignored
        by :meth:`fit`). Raises ``ValueError`` as :meth:`fit`."""
        items = items_from_prepared(prepared_dir, "training")
        fractions = [dense_fraction(im[0].numpy()) for im in load_images([it["image"] for it in items], int(image_size))]
        return cls.fit(fractions, [it["attributes"].get("density") for it in items]), len(items)

    def read(self, fractions: Sequence[float]) -> list[str]:
        """Density class of each dense fraction (``nan`` -> ``"?"``, which never matches a request)."""
        return ["?" if not np.isfinite(f) else self.classes[int(np.searchsorted(self.thresholds, f, side="right"))]
                for f in np.asarray(fractions, dtype=np.float64)]

    def read_images(self, images: torch.Tensor) -> list[str]:
        """``(N, 1, H, W)`` images in [0, 1] -> density classes."""
        return self.read([dense_fraction(im[0].cpu().numpy()) for im in images])


class MalignancyReader:
    """Benign-looking (BI-RADS 2-3) vs malignant-looking (BI-RADS 4-5) from a lesion's 67 normalised radiomic features:
    L2-regularised logistic regression on standardised features, fitted by Newton's method (deterministic, no
    library beyond numpy). The reconstruction-loop check of a requested per-lesion BI-RADS
    (:mod:`custom.data.lesion_labels`): fitted on real training lesions, its accuracy on real held-out lesions is the
    ceiling for generated ones.

    Args:
        weights: ``(F,)`` coefficients on the standardised features; ``bias``: intercept; ``mean`` / ``scale``:
            ``(F,)`` standardisation (``scale`` > 0).
    """

    classes = ("benign", "malignant")

    def __init__(self, weights: Sequence[float], bias: float, mean: Sequence[float], scale: Sequence[float]) -> None:
        self.weights = np.asarray(weights, dtype=np.float64)
        self.bias = float(bias)
        self.mean = np.asarray(mean, dtype=np.float64)
        self.scale = np.asarray(scale, dtype=np.float64)
        if not (self.weights.shape == self.mean.shape == self.scale.shape and self.weights.ndim == 1) \
                or (self.scale <= 0).any():
            raise ValueError("MalignancyReader: weights, mean and scale must be (F,) with scale > 0")

    @classmethod
    def fit(cls, features: Any, malignant: Sequence[bool], l2: float = 1.0, iterations: int = 50) -> "MalignancyReader":
        """Fit on ``features`` ``(N, F)`` and labels (True = BI-RADS 4-5); both classes are needed."""
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(malignant, dtype=np.float64)
        if x.ndim != 2 or y.shape != (x.shape[0],):
            raise ValueError(f"MalignancyReader.fit: (N, F) features and N labels expected, got {x.shape} and {y.shape}")
        if y.min() == y.max():
            raise ValueError("MalignancyReader.fit: both benign and malignant lesions are needed")
        mean, scale = x.mean(0), x.std(0)
        scale = np.where(scale > 1e-12, scale, 1.0)
        z = np.hstack([(x - mean) / scale, np.ones((x.shape[0], 1))])
        w = np.zeros(z.shape[1])
        reg = np.full(z.shape[1], float(l2))
        reg[-1] = 0.0  # no penalty on the intercept
        for _ in range(int(iterations)):
            p = 1.0 / (1.0 + np.exp(-(z @ w)))
            grad = z.T @ (p - y) + reg * w
            hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(reg) + 1e-9 * np.eye(z.shape[1])
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.abs(step).max() < 1e-10:
                break
        return cls(w[:-1], w[-1], mean, scale)

    def probability(self, features: Any) -> np.ndarray:
        """``(N,)`` probability of "malignant-looking" for ``(N, F)`` features."""
        x = np.atleast_2d(np.asarray(features, dtype=np.float64))
        return 1.0 / (1.0 + np.exp(-(((x - self.mean) / self.scale) @ self.weights + self.bias)))

    def read(self, features: Any) -> list[str]:
        """``"benign"`` / ``"malignant"`` per lesion (probability >= 0.5 -> malignant)."""
        return [self.classes[int(p >= 0.5)] for p in self.probability(features)]


def save_classifier(model: AttributeClassifier, path: str | os.PathLike) -> None:
    """``{"state_dict", "config"}`` written atomically."""
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "config": dict(model.config)}, tmp)


def load_classifier(path: str | os.PathLike) -> AttributeClassifier:
    """Load with ``weights_only=True``; a missing or foreign file is a :class:`MammoInputError`."""
    p = Path(path)
    if not p.is_file():
        raise MammoInputError(p, "attribute classifier not found: train it with `python -m "
                                 "custom.metrics.attribute_classifier train`")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle/zip errors of a corrupt or foreign file
        raise MammoInputError(p, f"unreadable attribute classifier ({type(err).__name__})") from None
    if not isinstance(obj, Mapping) or not {"state_dict", "config"} <= set(obj):
        raise MammoInputError(p, "not an attribute classifier file (needs 'state_dict' and 'config')")
    cfg = obj["config"]
    model = AttributeClassifier(int(cfg["image_size"]), cfg["channels"], cfg["heads"])
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as err:
        raise MammoInputError(p, f"weights do not fit the stored configuration ({str(err).splitlines()[0]})") from None
    return model.eval()


def _generated(folder: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    paths, attrs = [], []
    for side in sorted(Path(folder).glob("*.json")):
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError):
            continue
        png = side.with_suffix(".png")
        requested = (meta.get("parameters") or {}).get("attributes") if isinstance(meta, dict) else None
        if not requested or not png.is_file():
            continue
        a = {k: v for k, v in requested.items() if k in ("density", "view")}
        if requested.get("lesion_category") is not None:
            a["lesion"] = "no" if requested["lesion_category"] == "none" else "yes"
        paths.append(str(png))
        attrs.append(a)
    return paths, attrs


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m custom.metrics.attribute_classifier", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fit on the training split of a prepared folder")
    t.add_argument("--prepared_dir", required=True)
    t.add_argument("--output", required=True)
    t.add_argument("--image_size", type=int, default=64)
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("evaluate", help="accuracy on generated samples (sidecar attributes) and on the real test split")
    e.add_argument("--classifier", required=True)
    e.add_argument("--prepared_dir", required=True)
    e.add_argument("--generated_dir", required=True)
    e.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    if args.command == "train":
        items = items_from_prepared(args.prepared_dir, "training")
        if not items:
            raise MammoInputError(args.prepared_dir, "the training split is empty")
        model = train_attribute_classifier(load_images([i["image"] for i in items], args.image_size),
                                           [i["attributes"] for i in items], epochs=args.epochs, seed=args.seed)
        save_classifier(model, args.output)
        result = {"output": args.output, "n_train": len(items)}
    else:
        model = load_classifier(args.classifier)
        size = int(model.config["image_size"])
        real = items_from_prepared(args.prepared_dir, args.split)
        paths, requested = _generated(args.generated_dir)
        if not paths:
            raise MammoInputError(args.generated_dir, "no generated sample with requested attributes (sidecar "
                                                      "parameters.attributes) and a PNG")
        result = attribute_fidelity(model, load_images(paths, size), requested,
                                    load_images([i["image"] for i in real], size), [i["attributes"] for i in real])
        result.update(n_generated=len(paths), n_real=len(real), phantom_note="phantom figures: they say the loop works, "
                                                                               "not how a model does on real mammograms")
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return result


if __name__ == "__main__":
    try:
        main()
    except MammoInputError as err:
        sys.stderr.write(f"ERROR: {' '.join(str(err).split())}\n")
        sys.exit(1)
