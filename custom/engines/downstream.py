"""The ``downstream`` workflow: does a synthetic cohort help a task model? (GCDM appendix B; open question 2.)

``python -m monai.bundle run downstream --config_file bundle/configs/downstream.json`` trains one task model per
**arm** and **seed** and evaluates every one on the *real* test split:

* arms: ``real`` (the real training split), ``real+synthetic`` (the mixed folder ``synthesize --mix_with`` wrote),
  ``synthetic`` (the synthetic cohort alone) - each a prepared folder read by
  :func:`custom.data.training.load_prepared_datalist`;
* task model: a 2-D MONAI ``UNet`` with three output classes (0 background / breast, 1 benign lesion, 2 malignant
  lesion), trained by the stock ``monai.engines.SupervisedTrainer`` (``DiceCELoss``, Adam) for the same number of
  iterations in every arm (equal compute: the mixed arm does not get more steps because it has more images);
  predictions by ``monai.engines.SupervisedEvaluator`` with :class:`PredictionCollector`;
* **why a segmentation-based detector**: the labels are lesion masks, the images are small (64 px by default), and
  one dense network gives all three read-outs at once, trains in about a minute on two CPU cores and has no anchor /
  box-matching hyper-parameters to tune per dataset (MONAI's RetinaNet detector needs anchor shapes matched to the
  lesion sizes and far more compute); its boxes are the connected components of the lesion probability;
* read-outs per test image (probabilities ``p`` after softmax, lesion probability ``q = p1 + p2``):
  lesion-present score ``max q``; malignancy score ``sum(q^2 * p2/q) / sum(q^2)`` (the malignant share of the
  lesion probability, weighted towards confident lesion pixels); detections = 8-connected components of
  ``q >= detection_threshold``, box = the component's box, score = its maximum ``q``;
* metrics (:func:`roc_auc`, :func:`balanced_accuracy`, :func:`average_precision`, :func:`froc_sensitivity`):
  lesion-present AUC and balanced accuracy (threshold 0.5) over all test images; benign/malignant AUC and balanced
  accuracy over the test images with a lesion of known class (BI-RADS 2-3 benign, 4-6 malignant; an image is
  malignant when any of its lesions is); detection AP at IoU 0.5 (all-point interpolation, one class "lesion") and
  FROC sensitivity at 1 false positive per image;
* uncertainty (:func:`bootstrap`): a metric of an arm is the mean over its seeds; its 95 % interval is the
  percentile interval of that mean over ``bootstrap`` resamples of the test images (the same resamples for every
  arm), and the difference ``arm - real`` gets its interval from the same paired resamples.

Outputs in ``output_dir``: ``metrics.json`` (every arm x seed, the means, intervals and differences),
``report.md`` and ``downstream.png`` (the arms side by side with their intervals). On the phantom every output says
so (:data:`custom.engines.evaluation.PHANTOM_CAVEAT`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import MapTransform

from custom.errors import MammoInputError

__all__ = [
    "ARMS",
    "roc_auc",
    "balanced_accuracy",
    "box_iou",
    "average_precision",
    "froc_sensitivity",
    "bootstrap",
    "TaskTargetd",
    "task_items",
    "image_readouts",
    "PredictionCollector",
    "DownstreamStudy",
]

logger = logging.getLogger(__name__)
ARMS = ("real", "real+synthetic", "synthetic")


# ---------------------------------------------------------------------------------------------------- metrics
def roc_auc(y: Sequence[int] | np.ndarray, score: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > that of a random negative) + 0.5 P(tie)
    (Mann-Whitney U / (n_pos n_neg), average ranks for ties). ``nan`` when one class is absent."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def balanced_accuracy(y: Sequence[int] | np.ndarray, score: Sequence[float] | np.ndarray, threshold: float = 0.5) -> float:
    """Mean of sensitivity and specificity of ``score >= threshold``; ``nan`` when one class is absent."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(score, dtype=np.float64) >= threshold
    if y.all() or (~y).all():
        return float("nan")
    return float(0.5 * ((pred & y).sum() / y.sum() + (~pred & ~y).sum() / (~y).sum()))


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two pixel-edge boxes ``[xmin, ymin, xmax, ymax]``."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _match(detections: Sequence[Sequence[tuple[float, list[float]]]], truths: Sequence[Sequence[list[float]]],
           iou: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Greedy matching per image in descending score (VOC): ``(scores, is_tp, n_truths)`` over all images."""
    scores, tps = [], []
    for dets, gts in zip(detections, truths):
        used = [False] * len(gts)
        for score, box in sorted(dets, key=lambda d: -d[0]):
            best, best_j = 0.0, -1
            for j, g in enumerate(gts):
                if not used[j]:
                    v = box_iou(box, g)
                    if v > best:
                        best, best_j = v, j
            hit = best >= iou and best_j >= 0
            if hit:
                used[best_j] = True
            scores.append(score)
            tps.append(hit)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return np.asarray(scores)[order], np.asarray(tps, dtype=bool)[order], int(sum(len(g) for g in truths))


def average_precision(detections: Sequence[Sequence[tuple[float, list[float]]]], truths: Sequence[Sequence[list[float]]],
                      iou: float = 0.5) -> float:
    """Detection AP at ``iou`` (all-point interpolated precision-recall area, one class), pooled over images.

    Args:
        detections: per image, ``[(score, [xmin, ymin, xmax, ymax]), ...]``.
        truths: per image, the true boxes.
    Returns ``nan`` without any true box."""
    _, tp, n_gt = _match(detections, truths, iou)
    if n_gt == 0:
        return float("nan")
    if tp.size == 0:
        return 0.0
    ctp, cfp = np.cumsum(tp), np.cumsum(~tp)
    recall = ctp / n_gt
    precision = ctp / np.maximum(ctp + cfp, 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(mpre.size - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def froc_sensitivity(detections: Sequence[Sequence[tuple[float, list[float]]]], truths: Sequence[Sequence[list[float]]],
                     fp_per_image: float = 1.0, iou: float = 0.5) -> float:
    """Lesion sensitivity at the lowest score threshold whose false positives per image stay <= ``fp_per_image``
    (a detection is a true positive when it matches an unmatched true box at IoU >= ``iou``). ``nan`` without any
    true box."""
    _, tp, n_gt = _match(detections, truths, iou)
    if n_gt == 0:
        return float("nan")
    n_images = max(len(truths), 1)
    best = 0.0
    ctp = np.cumsum(tp) if tp.size else np.zeros(0)
    cfp = np.cumsum(~tp) if tp.size else np.zeros(0)
    for k in range(tp.size):
        if cfp[k] / n_images <= fp_per_image:
            best = max(best, ctp[k] / n_gt)
    return float(best)


def bootstrap(stat: Callable[[np.ndarray], float], n: int, n_boot: int = 1000, seed: int = 0,
              level: float = 0.95) -> dict[str, Any]:
    """Percentile bootstrap of ``stat(indices)`` over ``n`` items: ``{"value": stat(all), "low", "high",
    "n_boot": resamples used}``; a resample where the statistic is undefined (``nan``, e.g. one class absent) is
    left out and counted in ``"n_undefined"``."""
    value = float(stat(np.arange(n)))
    rng = np.random.default_rng(seed)
    vals = []
    undefined = 0
    for _ in range(int(n_boot)):
        v = float(stat(rng.integers(0, n, size=n)))
        if np.isfinite(v):
            vals.append(v)
        else:
            undefined += 1
    if not vals:
        return {"value": value, "low": float("nan"), "high": float("nan"), "n_boot": 0, "n_undefined": undefined}
    a = (1.0 - level) / 2.0
    low, high = np.quantile(np.asarray(vals), [a, 1.0 - a])
    return {"value": value, "low": float(low), "high": float(high), "n_boot": len(vals), "n_undefined": undefined}


# ---------------------------------------------------------------------------------------------------- data
class TaskTargetd(MapTransform):
    """``lesions`` instance map ``(1, S, S)`` + ``lesion_malignant`` (one 0/1 per lesion) -> ``label`` ``(1, S, S)``
    in {0 background/breast, 1 benign lesion, 2 malignant lesion}."""

    def __init__(self, instance_key: str = "lesions", malignant_key: str = "lesion_malignant", output_key: str = "label"):
        super().__init__(keys=[instance_key])
        self.instance_key, self.malignant_key, self.output_key = instance_key, malignant_key, output_key

    def __call__(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        d = dict(data)
        inst = torch.as_tensor(np.asarray(d[self.instance_key])).round().long()
        target = torch.zeros_like(inst, dtype=torch.float32)
        for k, malignant in enumerate(d[self.malignant_key], start=1):
            target[inst == k] = 2.0 if malignant else 1.0
        d[self.output_key] = target
        return d


def task_items(prepared_dir: str | os.PathLike, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Items of ``split`` (:func:`custom.data.training.load_prepared_datalist`, absolute paths) with the task labels:
    ``lesion_malignant`` per lesion (unknown BI-RADS counts as benign for training), ``lesion_present`` (0/1),
    ``malignant`` (1 malignant / 0 benign / -1 no lesion or unknown class) and ``synthetic``."""
    from custom.data.training import load_prepared_datalist
    from custom.features.presets import malignancy_from_birads

    root = Path(prepared_dir)
    items = load_prepared_datalist(root, split, max_lesions=2, limit=limit)
    raw = {str(e["case_id"]): e for e in json.loads((root / "datalist.json").read_text())[split]}
    out = []
    for it in items:
        e = raw[str(it["case_id"])]
        findings = sorted(e.get("findings") or [], key=lambda f: int(f.get("lesion_index", 0)))
        classes = [malignancy_from_birads(f.get("birads")) for f in findings]
        n = int(e.get("num_lesions", 0))
        known = [c for c in classes if c is not None]
        out.append({
            "case_id": it["case_id"], "image": it["image"], "lesions": it["lesions"],
            "lesion_malignant": [1 if c == "malignant" else 0 for c in classes] + [0] * max(0, n - len(classes)),
            "lesion_present": int(n > 0),
            "malignant": (1 if "malignant" in known else 0) if n > 0 and known else -1,
            "synthetic": bool(e.get("synthetic", False)),
        })
    return out


def _transforms(image_size: int, train: bool) -> Any:
    from monai.data import PILReader
    from monai.transforms import Compose, EnsureTyped, LoadImaged, RandFlipd, Resized, ScaleIntensityRanged, SelectItemsd

    xf: list = [
        LoadImaged(keys=["image", "lesions"], reader=PILReader(reverse_indexing=False), image_only=True,
                   ensure_channel_first=True),
        ScaleIntensityRanged(keys="image", a_min=0.0, a_max=65535.0, b_min=0.0, b_max=1.0, clip=True),
        Resized(keys=["image", "lesions"], spatial_size=(image_size, image_size), mode=("area", "nearest-exact")),
        TaskTargetd(),
        EnsureTyped(keys=["image", "label", "lesions"], dtype=torch.float32, track_meta=False),
        SelectItemsd(keys=["image", "label", "lesions"]),
    ]
    if train:
        xf += [RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0)]
    return Compose(xf)


def image_readouts(probs: torch.Tensor, threshold: float = 0.3) -> dict[str, Any]:
    """One image's read-outs from its class probabilities ``(3, S, S)`` (see the module docstring):
    ``{"lesion_score", "malignant_score", "detections": [(score, box)]}``."""
    from scipy import ndimage

    p = probs.detach().float().cpu().numpy()
    q = p[1] + p[2]
    w = q * q
    malignant = float((w * (p[2] / np.maximum(q, 1e-8))).sum() / max(w.sum(), 1e-12))
    comp, n = ndimage.label(q >= threshold, structure=np.ones((3, 3)))
    dets = []
    for k, sl in enumerate(ndimage.find_objects(comp), start=1):
        if sl is None:
            continue
        score = float(q[sl][comp[sl] == k].max())
        dets.append((score, [float(sl[1].start), float(sl[0].start), float(sl[1].stop), float(sl[0].stop)]))
    return {"lesion_score": float(q.max()), "malignant_score": malignant, "detections": dets}


def _truth_boxes(instances: np.ndarray) -> list[list[float]]:
    from scipy import ndimage

    boxes = []
    for sl in ndimage.find_objects(np.asarray(instances).astype(np.int64)):
        if sl is not None:
            boxes.append([float(sl[1].start), float(sl[0].start), float(sl[1].stop), float(sl[0].stop)])
    return boxes


class PredictionCollector:
    """Evaluator handler (ITERATION_COMPLETED) keeping the read-outs of every image in order. A custom piece:
    MONAI's metric handlers reduce to one number; the bootstrap needs the per-image scores."""

    def __init__(self, threshold: float = 0.3) -> None:
        self.threshold = float(threshold)
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        pred = torch.softmax(engine.state.output["pred"].float(), dim=1)
        instances = engine.state.batch["lesions"]
        for i in range(pred.shape[0]):
            r = image_readouts(pred[i], self.threshold)
            r["truth_boxes"] = _truth_boxes(torch.as_tensor(instances[i, 0]).round().long().cpu().numpy())
            self.rows.append(r)


# ---------------------------------------------------------------------------------------------------- the study
class DownstreamStudy:
    """Train every arm x seed, evaluate on the real test split, write the report (see the module docstring).

    Args:
        real_dir: the real prepared folder (its ``training`` split is the ``real`` arm, its ``test`` split the test set).
        synthetic_dir: the synthetic cohort (``synthesize`` output), the ``synthetic`` arm.
        mixed_dir: the mixed folder (``synthesize --mix_with``), the ``real+synthetic`` arm.
        arms: which arms to run (subset of :data:`ARMS`).
        seeds: training seeds per arm.
        output_dir: where ``metrics.json``, ``report.md`` and ``downstream.png`` go.
        image_size: task-model resolution; channels/strides: the UNet's.
        iterations, batch_size, lr: training budget per run (the same in every arm).
        detection_threshold: lesion probability that starts a detection component.
        n_boot, boot_seed: bootstrap resamples and their seed.
        phantom: ``"auto"`` / true / false: label the outputs as phantom results.
        device: training device.
    """

    def __init__(self, real_dir: str, synthetic_dir: str | None = None, mixed_dir: str | None = None,
                 arms: Sequence[str] = ARMS, seeds: Sequence[int] = (0, 1, 2), output_dir: str = "runs/downstream",
                 image_size: int = 64, channels: Sequence[int] = (16, 32, 64, 128), num_res_units: int = 1,
                 iterations: int = 150, batch_size: int = 16, lr: float = 3e-3, detection_threshold: float = 0.3,
                 n_boot: int = 1000, boot_seed: int = 0, phantom: Any = "auto", device: Any = "cpu",
                 test_limit: int | None = None, progress: bool = False) -> None:
        self.dirs = {"real": real_dir, "real+synthetic": mixed_dir, "synthetic": synthetic_dir}
        self.arms = [str(a) for a in arms]
        self.seeds = [int(s) for s in seeds]
        self.output_dir = Path(output_dir)
        self.image_size = int(image_size)
        self.channels = [int(c) for c in channels]
        self.num_res_units = int(num_res_units)
        self.iterations, self.batch_size, self.lr = int(iterations), int(batch_size), float(lr)
        self.detection_threshold = float(detection_threshold)
        self.n_boot, self.boot_seed = int(n_boot), int(boot_seed)
        self.phantom_setting = phantom
        self.device = torch.device(device)
        self.test_limit = test_limit
        self.progress = progress
        self.results: dict[str, Any] = {}

    # checks ------------------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Every problem before any training: unknown arms, no seeds, a missing folder or split, an empty test set."""
        from custom.engines.inference import check_output_dir

        bad = [a for a in self.arms if a not in ARMS]
        if bad or not self.arms:
            raise MammoInputError("arms", f"unknown arm(s) {bad} (use any of {list(ARMS)})")
        if not self.seeds:
            raise MammoInputError("seeds", "give at least one training seed")
        if self.iterations < 1 or self.batch_size < 1:
            raise MammoInputError("iterations", "iterations and batch_size must be at least 1")
        if self.n_boot < 1:
            raise MammoInputError("n_boot", f"must be at least 1, got {self.n_boot}")
        for arm in self.arms:
            d = self.dirs[arm]
            key = {"real": "real_dir", "real+synthetic": "mixed_dir", "synthetic": "synthetic_dir"}[arm]
            if not d or not (Path(d) / "datalist.json").is_file():
                hint = "run `prepare`" if arm == "real" else "run `synthesize` (with --mix_with for the mixed arm)"
                raise MammoInputError(d or key, f"the {arm!r} arm needs a prepared folder with datalist.json ({key}): {hint}")
        check_output_dir(self.output_dir)

    # one run -----------------------------------------------------------------------------------------------------
    def _network(self) -> torch.nn.Module:
        from monai.networks.nets import UNet

        return UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=self.channels,
                    strides=[2] * (len(self.channels) - 1), num_res_units=self.num_res_units).to(self.device)

    def train_one(self, items: Sequence[Mapping[str, Any]], seed: int) -> torch.nn.Module:
        """One task model trained by ``monai.engines.SupervisedTrainer`` for ``iterations`` steps (sampling with
        replacement, so every arm gets the same number of steps)."""
        from monai.data import CacheDataset, DataLoader
        from monai.engines import SupervisedTrainer
        from monai.losses import DiceCELoss
        from monai.utils import set_determinism

        set_determinism(seed=seed)
        ds = CacheDataset(list(items), transform=_transforms(self.image_size, train=True), progress=False, num_workers=0)
        gen = torch.Generator().manual_seed(seed)
        sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=self.iterations * self.batch_size,
                                                 generator=gen)
        loader = DataLoader(ds, batch_size=self.batch_size, sampler=sampler, num_workers=0)
        net = self._network()
        trainer = SupervisedTrainer(
            device=self.device, max_epochs=1, train_data_loader=loader, network=net,
            optimizer=torch.optim.Adam(net.parameters(), lr=self.lr),
            loss_function=DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True),
            amp=False,
        )
        if self.progress:
            from ignite.handlers import ProgressBar

            ProgressBar(persist=False).attach(trainer, output_transform=lambda out: {"loss": out[0]["loss"]} if isinstance(out, list) else {})
        trainer.run()
        set_determinism(seed=None)
        return net

    def predict(self, net: torch.nn.Module, items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Read-outs of every test image by ``monai.engines.SupervisedEvaluator`` + :class:`PredictionCollector`."""
        from monai.data import CacheDataset, DataLoader
        from monai.engines import SupervisedEvaluator

        ds = CacheDataset(list(items), transform=_transforms(self.image_size, train=False), progress=False, num_workers=0)
        collector = PredictionCollector(self.detection_threshold)
        evaluator = SupervisedEvaluator(device=self.device, val_data_loader=DataLoader(ds, batch_size=8, shuffle=False),
                                        network=net, val_handlers=[collector], decollate=False)
        evaluator.run()
        return collector.rows

    # metrics -----------------------------------------------------------------------------------------------------
    @staticmethod
    def metric_functions(test: Sequence[Mapping[str, Any]]) -> dict[str, Callable[[list[list[dict]], np.ndarray], float]]:
        """``{name: f(per-seed read-outs, indices) -> mean over seeds}`` on the test items."""
        present = np.asarray([t["lesion_present"] for t in test])
        malignant = np.asarray([t["malignant"] for t in test])

        def mean(vals):
            vals = [v for v in vals]
            return float(np.mean(vals)) if vals and all(np.isfinite(vals)) else float("nan")

        def present_auc(runs, idx):
            return mean([roc_auc(present[idx], [r[i]["lesion_score"] for i in idx]) for r in runs])

        def present_bacc(runs, idx):
            return mean([balanced_accuracy(present[idx], [r[i]["lesion_score"] for i in idx]) for r in runs])

        def malig_auc(runs, idx):
            idx = [i for i in idx if malignant[i] >= 0]
            return mean([roc_auc(malignant[idx], [r[i]["malignant_score"] for i in idx]) for r in runs])

        def malig_bacc(runs, idx):
            idx = [i for i in idx if malignant[i] >= 0]
            return mean([balanced_accuracy(malignant[idx], [r[i]["malignant_score"] for i in idx]) for r in runs])

        def det_ap(runs, idx):
            return mean([average_precision([r[i]["detections"] for i in idx], [r[i]["truth_boxes"] for i in idx]) for r in runs])

        def det_froc(runs, idx):
            return mean([froc_sensitivity([r[i]["detections"] for i in idx], [r[i]["truth_boxes"] for i in idx]) for r in runs])

        return {"lesion_auc": present_auc, "lesion_balanced_accuracy": present_bacc, "malignancy_auc": malig_auc,
                "malignancy_balanced_accuracy": malig_bacc, "detection_ap50": det_ap, "froc_sens_at_1fp": det_froc}

    def summarise(self, test: Sequence[Mapping[str, Any]], readouts: Mapping[str, list[list[dict]]]) -> dict[str, Any]:
        """Means over seeds with bootstrap intervals per arm, and ``arm - real`` differences on paired resamples."""
        n = len(test)
        fns = self.metric_functions(test)
        arms: dict[str, Any] = {}
        diffs: dict[str, Any] = {}
        for arm, runs in readouts.items():
            arms[arm] = {name: bootstrap(lambda idx, f=f, r=runs: f(r, idx), n, self.n_boot, self.boot_seed)
                         for name, f in fns.items()}
            arms[arm]["per_seed"] = {name: [f([r], np.arange(n)) for r in runs] for name, f in fns.items()}
        if "real" in readouts:
            for arm, runs in readouts.items():
                if arm == "real":
                    continue
                diffs[arm] = {name: bootstrap(lambda idx, f=f, r=runs: f(r, idx) - f(readouts["real"], idx), n,
                                              self.n_boot, self.boot_seed) for name, f in fns.items()}
        return {"arms": arms, "differences_vs_real": diffs}

    # the whole study ---------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from custom.engines.evaluation import PHANTOM_CAVEAT, is_phantom
        from custom.io import atomic_write_json

        self.check()
        start = time.time()
        test = task_items(self.dirs["real"], "test", limit=self.test_limit)
        if not test:
            raise MammoInputError(Path(self.dirs["real"]) / "datalist.json", "the real test split is empty")
        train = {arm: task_items(self.dirs[arm], "training") for arm in self.arms}
        for arm, items in train.items():
            if not items:
                raise MammoInputError(Path(self.dirs[arm]) / "datalist.json", f"the {arm!r} arm has no training image")
        phantom = is_phantom(self.dirs["real"], self.phantom_setting)
        readouts: dict[str, list[list[dict]]] = {}
        timings = {}
        for arm in self.arms:
            readouts[arm] = []
            for seed in self.seeds:
                t0 = time.time()
                net = self.train_one(train[arm], seed)
                readouts[arm].append(self.predict(net, test))
                timings[f"{arm}/seed{seed}"] = round(time.time() - t0, 1)
                print(f"downstream: {arm} seed {seed} trained on {len(train[arm])} images and evaluated on "
                      f"{len(test)} real test images in {timings[f'{arm}/seed{seed}']:.1f} s", flush=True)
        summary = self.summarise(test, readouts)
        self.results = {
            "phantom": phantom, "caveat": PHANTOM_CAVEAT if phantom else None,
            "dirs": {a: self.dirs[a] for a in self.arms},
            "train_images": {a: len(v) for a, v in train.items()},
            "train_synthetic_images": {a: int(sum(i["synthetic"] for i in v)) for a, v in train.items()},
            "test_images": len(test), "test_with_lesion": int(sum(t["lesion_present"] for t in test)),
            "test_with_known_class": int(sum(t["malignant"] >= 0 for t in test)),
            "test_malignant": int(sum(t["malignant"] == 1 for t in test)),
            "seeds": self.seeds, "task_model": {"network": "monai UNet (3 classes)", "channels": self.channels,
                                                 "image_size": self.image_size, "iterations": self.iterations,
                                                 "batch_size": self.batch_size, "lr": self.lr,
                                                 "detection_threshold": self.detection_threshold},
            "bootstrap": {"resamples": self.n_boot, "seed": self.boot_seed, "level": 0.95},
            **summary, "seconds": round(time.time() - start, 1), "seconds_per_run": timings,
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.output_dir / "metrics.json", json.loads(json.dumps(self.results, default=float).replace("NaN", "null")))
        figure = self.figure(self.output_dir / "downstream.png")
        from custom.io import atomic_write_text

        atomic_write_text(self.output_dir / "report.md", self.report(figure.name if figure else None))
        print(self.table(), flush=True)
        print(f"downstream: report in {self.output_dir / 'report.md'}", flush=True)
        return self.results

    # report ------------------------------------------------------------------------------------------------------
    NAMES = {"lesion_auc": "lesion-present AUC", "lesion_balanced_accuracy": "lesion-present bal. acc.",
             "malignancy_auc": "benign/malignant AUC", "malignancy_balanced_accuracy": "benign/malignant bal. acc.",
             "detection_ap50": "detection AP@0.5", "froc_sens_at_1fp": "FROC sens. @1 FP/img"}

    @staticmethod
    def _ci(m: Mapping[str, Any], signed: bool = False) -> str:
        v, lo, hi = m.get("value"), m.get("low"), m.get("high")
        if v is None or not np.isfinite(v):
            return "n/a"
        fmt = "{:+.3f}" if signed else "{:.3f}"
        if lo is None or not np.isfinite(lo):
            return fmt.format(v)
        return f"{fmt.format(v)} [{fmt.format(lo)}, {fmt.format(hi)}]"

    def table(self) -> str:
        arms = list(self.results["arms"])
        diffs = self.results["differences_vs_real"]
        head = ["metric"] + arms + [f"{a} - real" for a in diffs]
        lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for key, name in self.NAMES.items():
            row = [name] + [self._ci(self.results["arms"][a][key]) for a in arms]
            row += [self._ci(diffs[a][key], signed=True) for a in diffs]
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)

    def report(self, figure: str | None) -> str:
        r = self.results
        title = "# Downstream benefit of synthetic images" + (" (PHANTOM data)" if r["phantom"] else "")
        parts = [title, ""]
        if r["phantom"]:
            parts += [f"**{r['caveat']}**", ""]
        parts += [
            f"Task model: MONAI UNet (3 classes: background, benign lesion, malignant lesion) at {self.image_size} px, "
            f"{self.iterations} iterations of batch {self.batch_size} per run (the same in every arm), seeds "
            f"{self.seeds}. Test set: the real test split ({r['test_images']} images, {r['test_with_lesion']} with a "
            f"lesion, {r['test_with_known_class']} of known benign/malignant class, {r['test_malignant']} malignant).",
            "",
            "Training images per arm: " + ", ".join(f"{a}: {n} ({r['train_synthetic_images'][a]} synthetic)"
                                                     for a, n in r["train_images"].items()) + ".",
            "",
            "Each cell: the mean over seeds, with its 95 % percentile bootstrap interval over the test images "
            f"({self.n_boot} resamples; differences use the same paired resamples).",
            "",
            self.table(),
            "",
        ]
        if figure:
            parts += [f"![downstream]({figure})", ""]
        parts += ["Detection: connected components of the lesion probability (>= "
                  f"{self.detection_threshold}) as boxes scored by their maximum probability; AP at IoU 0.5 "
                  "(all-point interpolation) and FROC sensitivity at 1 false positive per image.", ""]
        return "\n".join(parts)

    def figure(self, path: Path) -> Path | None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        arms = list(self.results["arms"])
        keys = list(self.NAMES)
        fig, ax = plt.subplots(figsize=(10, 4))
        width = 0.8 / max(len(arms), 1)
        for j, arm in enumerate(arms):
            vals, los, his = [], [], []
            for k in keys:
                m = self.results["arms"][arm][k]
                v = m["value"] if m["value"] is not None and np.isfinite(m["value"]) else 0.0
                lo = m["low"] if m["low"] is not None and np.isfinite(m["low"]) else v
                hi = m["high"] if m["high"] is not None and np.isfinite(m["high"]) else v
                vals.append(v), los.append(max(v - lo, 0)), his.append(max(hi - v, 0))
            x = np.arange(len(keys)) + (j - (len(arms) - 1) / 2) * width
            ax.bar(x, vals, width, yerr=[los, his], capsize=3, label=arm)
        ax.set_xticks(np.arange(len(keys)))
        ax.set_xticklabels([self.NAMES[k] for k in keys], rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)
        title = "Task model trained on real / real+synthetic / synthetic, tested on real (95 % bootstrap CI)"
        if self.results["phantom"]:
            title = "PHANTOM DATA - " + title
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
