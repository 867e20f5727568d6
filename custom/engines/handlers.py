"""Ignite handlers for stage 2 (each has ``attach(engine)``, so a bundle config lists them in ``train#handlers``).

* :class:`EMA`: exponential moving average of the network weights (used for sampling, saved in checkpoints).
* :class:`StopOnNonFiniteLoss`: raise with a clear message as soon as the loss is NaN/inf (before the backward pass).
* :class:`SampleGridHandler`: every N iterations, sample fixed validation conditions from fixed noise with the EMA
  weights and write a PNG grid (soft mask | sample | real) to the log folder and TensorBoard.
* :class:`LossCSVWriter`: ``iteration, epoch, train_loss, val_loss, lr`` per epoch into a CSV file.
* :class:`ModelExport`: the final ``models/model.pt`` when training completes.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.engines.utils import IterationEvents
from monai.utils import AdversarialIterationEvents, CommonKeys
from torch import nn

from custom.checkpoints import save_checkpoint
from custom.io import atomic_path, atomic_write, atomic_write_json

__all__ = ["EMA", "StopOnNonFiniteLoss", "LossProgressBar", "SampleGridHandler", "LossCSVWriter", "ModelExport", "loss_output", "unwrap", "soft_mask_rgb"]

logger = logging.getLogger(__name__)


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` wrappers."""
    while True:
        if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            network = network.module
        elif hasattr(network, "_orig_mod"):
            network = network._orig_mod
        else:
            return network


def is_main_process() -> bool:
    """``True`` on rank 0 of a ``torch.distributed`` run, and always without one."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def loss_output(output: Any) -> float | None:
    """The scalar loss of an engine output (a dict, or a list of dicts after decollation); ``None`` if absent.
    Use it as the ``output_transform`` of ``StatsHandler`` / ``TensorBoardStatsHandler``."""
    if isinstance(output, list) and output:
        output = output[0]
    if isinstance(output, Mapping) and CommonKeys.LOSS in output:
        v = output[CommonKeys.LOSS]
        return float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)
    return None


class EMA:
    """Exponential moving average of a network's parameters: ``ema = d * ema + (1 - d) * online``.

    The decay warms up as ``d_k = min(decay, (1 + k) / (10 + k))`` (``k`` = update count, derived from the trainer's
    iteration, so a resumed run continues the same schedule); buffers are copied. ``ema_model`` is a frozen deep copy
    of the (unwrapped) network, in eval mode; put it in a checkpoint's ``save_dict`` to save/resume it.

    Why not ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``: it has a constant decay (no
    warm-up), its first update copies the weights, and its update counter lives in its own state instead of
    following the trainer's iteration — the averaged weights of the recorded runs would change.

    Args:
        network: the online network (DDP / compile wrappers are unwrapped).
        decay: final decay.
        warmup: use the warm-up schedule above (else ``decay`` from the start).
        every: update every ``every`` iterations (set it to the gradient-accumulation steps).
    """

    def __init__(self, network: nn.Module, decay: float = 0.999, warmup: bool = True, every: int = 1) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1), got {decay}")
        self.model = unwrap(network)
        self.ema_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.every = max(1, int(every))

    def decay_at(self, updates: int) -> float:
        return min(self.decay, (1.0 + updates) / (10.0 + updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, updates: int) -> None:
        d = self.decay_at(updates)
        for e, p in zip(self.ema_model.parameters(), self.model.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1.0 - d)
        for e, b in zip(self.ema_model.buffers(), self.model.buffers()):
            e.copy_(b)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self)

    def __call__(self, engine: Engine) -> None:
        self.update(engine.state.iteration // self.every - 1)


#: Scalar loss terms a trainer iteration puts into ``engine.state.output`` (when active).
LOSS_KEYS = ("loss", "recon_loss", "kl_loss", "perceptual_loss", "g_adv_loss", "d_loss")


class NonFiniteLossError(FloatingPointError):
    """A training loss term is NaN or infinite."""


class NonFiniteLossHandler:
    """Stop training with :class:`NonFiniteLossError` when a loss term is NaN/inf, checked right after the losses
    are computed (``IterationEvents.LOSS_COMPLETED``, and the discriminator's loss event when the engine has one),
    i.e. before the backward pass and the optimiser step: the weights, the EMA and any checkpoint stay finite.

    Why not ignite's ``TerminateOnNan``: it runs at ``ITERATION_COMPLETED`` (after the optimiser step has applied the
    non-finite update) and ends the run quietly instead of with an error naming the iteration.

    Args:
        loss_keys: output entries to check (default :data:`LOSS_KEYS`).
        hint: what to try, appended to the message.
    """

    def __init__(self, loss_keys: Sequence[str] = LOSS_KEYS,
                 hint: str = "check the inputs for NaN/inf, lower the learning rate, or switch amp off") -> None:
        self.loss_keys = tuple(loss_keys)
        self.hint = hint

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)
        if AdversarialIterationEvents.DISCRIMINATOR_LOSS_COMPLETED in engine._allowed_events:
            engine.add_event_handler(AdversarialIterationEvents.DISCRIMINATOR_LOSS_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        if not isinstance(out, Mapping):
            return
        values = {k: float(out[k].detach().float().mean() if isinstance(out[k], torch.Tensor) else out[k])
                  for k in self.loss_keys if k in out and out[k] is not None}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            detail = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
            msg = (f"non-finite training loss at iteration {engine.state.iteration} (epoch {engine.state.epoch}): "
                   f"{', '.join(bad)} ({detail}); training stopped before the optimiser step. Try: {self.hint}")
            logger.error(msg)
            raise NonFiniteLossError(msg)


class LossProgressBar:
    """An ``ignite.handlers.ProgressBar`` over each epoch's iterations showing the training loss terms.

    Why a wrapper: MONAI attaches a handler with ``handler.attach(engine)`` only, while ignite's ``ProgressBar``
    takes the values to show (``output_transform``) in ``attach``.

    Args:
        output_transform: engine output -> ``{name: float}`` to show (default: the loss, :func:`loss_output`).
        persist: keep the bar after each epoch.
        enabled: ``False`` attaches nothing (``--progress false``).
    """

    def __init__(self, output_transform: Callable | None = None, persist: bool = False, enabled: bool = True) -> None:
        self.output_transform = output_transform or (lambda out: {"loss": loss_output(out)})
        self.persist, self.enabled = persist, enabled

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            ProgressBar(persist=self.persist).attach(engine, output_transform=self.output_transform)


def soft_mask_rgb(soft_mask: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` soft mask ``[background, breast, lesion]`` -> ``(3, H, W)`` RGB in ``[0, 1]``: breast grey,
    lesion red."""
    breast, lesion = soft_mask[1].clamp(0, 1), soft_mask[2].clamp(0, 1)
    grey = 0.45 * torch.maximum(breast, lesion)
    return torch.stack([(grey + lesion).clamp(0, 1), grey * (1 - lesion), grey * (1 - lesion)])


class SampleGridHandler:
    """Sample fixed validation conditions with fixed noise every ``interval`` iterations (and at the end).

    Writes ``<output_dir>/samples_iter<NNNNNN>.png`` and ``samples_latest.png``: one row per case, columns
    soft mask (breast grey, lesion red) | sample | real image; and the same grid to TensorBoard (tag ``tag``).

    Args:
        network: the network to sample with (the EMA copy: ``$@ema.ema_model``).
        encoder: the ``FrozenLatentEncoder`` (mask latents, decoding).
        scheduler: the DDIM sampling scheduler.
        data: prepared datalist items (``load_prepared_datalist``); the first ``num_samples`` with a lesion are
            used (then lesion-free ones if too few).
        image_size, sigma, max_lesions: as in training.
        output_dir: folder of the PNGs.
        interval: iterations between grids (0: only at the end).
        num_samples, ddim_steps, guidance_scale, seed: sampling settings.
        summary_writer: a ``SummaryWriter`` (optional).
        device: where sampling runs.
        progress: tqdm bar over DDIM steps.
    """

    def __init__(
        self,
        network: nn.Module,
        encoder: Any,
        scheduler: Any,
        data: Sequence[Mapping[str, Any]],
        image_size: int | None,
        sigma: float,
        max_lesions: int,
        output_dir: str | os.PathLike,
        interval: int = 200,
        num_samples: int = 4,
        ddim_steps: int = 50,
        guidance_scale: float = 3.0,
        seed: int = 0,
        summary_writer: Any | None = None,
        device: str | torch.device | None = None,
        progress: bool = False,
        tag: str = "samples",
    ) -> None:
        self.network = network
        self.encoder = encoder
        self.scheduler = scheduler
        with_lesion = [d for d in data if d.get("num_lesions", 0) > 0]
        self.data = (with_lesion + [d for d in data if d.get("num_lesions", 0) == 0])[: int(num_samples)]
        if not self.data:
            raise ValueError("SampleGridHandler: no cases to sample for")
        self.image_size, self.sigma, self.max_lesions = image_size, sigma, max_lesions
        self.output_dir = Path(output_dir)
        self.interval = int(interval)
        self.ddim_steps, self.guidance_scale, self.seed = int(ddim_steps), float(guidance_scale), int(seed)
        self.summary_writer = summary_writer
        self.device = torch.device(device) if device is not None else None
        self.progress = progress
        self.tag = tag
        self._batch: dict[str, torch.Tensor] | None = None
        self.last_path: Path | None = None
        self._last_iteration = -1

    def attach(self, engine: Engine) -> None:
        if self.interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def conditions(self) -> dict[str, torch.Tensor]:
        """The fixed batch: ``image``, ``soft_mask``, ``mask_latent``, ``features``, ``lesion_masks``,
        ``lesion_present`` (computed once)."""
        if self._batch is None:
            from custom.data.training import prepared_transforms

            xf = prepared_transforms(image_size=self.image_size, sigma=self.sigma, max_lesions=self.max_lesions)
            items = [xf(dict(d)) for d in self.data]
            keys = ["image", "soft_mask", "features", "lesion_masks", "lesion_present"]
            batch = {k: torch.stack([torch.as_tensor(it[k]).float() for it in items]) for k in keys}
            device = self.device or next(self.encoder.parameters()).device
            batch = {k: v.to(device) for k, v in batch.items()}
            batch["mask_latent"] = self.encoder.encode_mask(batch["soft_mask"])
            for key in ("attributes", "lesion_labels"):  # codes (custom.data.attributes / custom.data.lesion_labels)
                if items and all(key in it for it in items):
                    batch[key] = torch.stack([torch.as_tensor(it[key]).long() for it in items]).to(device)
            self._batch = batch
        return self._batch

    def sample(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Decoded samples ``(N, 1, H, W)`` in ``[0, 1]`` for the fixed conditions, and the conditions."""
        from custom.engines.sampling import ddim_sample

        c = self.conditions()
        extra = {k: c[k] for k in ("attributes", "lesion_labels") if k in c}
        if getattr(self.network, "extra_concat_channels", 0):  # inpainting model: generate the whole image
            from custom.engines.inpaint import inpaint_concat

            extra["extra_concat"] = inpaint_concat(self.encoder, torch.zeros_like(c["image"]), torch.ones_like(c["image"]))
        out = ddim_sample(
            self.network, self.scheduler, c["mask_latent"], c["features"], c["lesion_masks"], c["lesion_present"],
            num_inference_steps=self.ddim_steps, guidance_scale=self.guidance_scale, seed=self.seed,
            decoder=self.encoder, progress=self.progress, **extra,
        )
        return out.images, c

    @staticmethod
    def grid(images: torch.Tensor, cond: Mapping[str, torch.Tensor], pad: int = 2) -> np.ndarray:
        """``(rows*S + pads, 3*S + pads, 3)`` uint8 grid: soft mask | sample | real per row."""
        rows = []
        for i in range(images.shape[0]):
            tiles = [
                soft_mask_rgb(cond["soft_mask"][i].float().cpu()),
                images[i].float().cpu().expand(3, -1, -1),
                cond["image"][i].float().cpu().clamp(0, 1).expand(3, -1, -1),
            ]
            rows.append(tiles)
        s_h, s_w = images.shape[-2:]
        h = len(rows) * s_h + (len(rows) + 1) * pad
        w = 3 * s_w + 4 * pad
        canvas = torch.ones(3, h, w)
        for r, tiles in enumerate(rows):
            for c, t in enumerate(tiles):
                y, x = pad + r * (s_h + pad), pad + c * (s_w + pad)
                canvas[:, y : y + s_h, x : x + s_w] = t
        return (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

    def write(self, iteration: int) -> Path:
        from PIL import Image

        images, cond = self.sample()
        arr = self.grid(images, cond)
        zoom = max(1, 128 // max(1, int(images.shape[-1])))
        img = Image.fromarray(arr)
        if zoom > 1:
            img = img.resize((img.width * zoom, img.height * zoom), Image.NEAREST)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / f"samples_iter{iteration:06d}.png"
        for target in (path, self.output_dir / "samples_latest.png"):
            with atomic_path(target) as tmp:
                img.save(tmp)
        if self.summary_writer is not None:
            self.summary_writer.add_image(self.tag, arr, global_step=iteration, dataformats="HWC")
            self.summary_writer.flush()
        logger.info("sample grid (iteration %d): %s", iteration, path)
        self.last_path = path
        return path

    def __call__(self, engine: Engine) -> None:
        it = int(engine.state.iteration)
        if it == self._last_iteration:  # COMPLETED right after an interval grid
            return
        self._last_iteration = it
        self.write(it)


class LossCSVWriter:
    """Append ``iteration, epoch, train_loss (epoch mean), val_loss, lr`` to a CSV file at every epoch end.

    ``val_loss`` is the evaluator's ``metric_name`` when it ran since the previous row (list this handler *after*
    the ``ValidationHandler`` so that validation of the same epoch is included), else empty.

    Args:
        path: the CSV file (a header is written when it is created; a resumed run appends).
        evaluator: the validation engine (optional).
        metric_name: its metric holding the validation noise MSE.
        optimizer: to log the learning rate (optional).
    """

    FIELDS = ["iteration", "epoch", "train_loss", "val_loss", "lr"]

    def __init__(self, path: str | os.PathLike, evaluator: Engine | None = None, metric_name: str = "val_noise_mse", optimizer: Any | None = None) -> None:
        self.path = Path(path)
        self.evaluator = evaluator
        self.metric_name = metric_name
        self.optimizer = optimizer
        self._sum, self._n = 0.0, 0
        self._val: float | None = None
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.COMPLETED, self._record_val)

    def _accumulate(self, engine: Engine) -> None:
        v = loss_output(engine.state.output)
        if v is not None:
            self._sum += v
            self._n += 1

    def _record_val(self, evaluator: Engine) -> None:
        v = evaluator.state.metrics.get(self.metric_name)
        self._val = None if v is None else float(v)

    def _write(self, engine: Engine) -> None:
        row = {
            "iteration": engine.state.iteration,
            "epoch": engine.state.epoch,
            "train_loss": f"{self._sum / self._n:.6g}" if self._n else "",
            "val_loss": "" if self._val is None else f"{self._val:.6g}",
            "lr": f"{self.optimizer.param_groups[0]['lr']:.6g}" if self.optimizer is not None else "",
        }
        self._sum, self._n, self._val = 0.0, 0, None
        self.rows.append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file()
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=self.FIELDS)
            if new:
                w.writeheader()
            w.writerow(row)


class ModelExport:
    """Write the final model file when training completes (rank 0 only: disable it on other ranks).

    ``model.pt`` = ``{"model": EMA weights (the sampling weights; MONAI Label reads checkpoint.get("model")),
    "network": online weights, "scale_factor": latent scale factor (0-d tensor)}``, written atomically; ``info_path``
    (JSON) records what the weights are: iteration, epoch, EMA decay, latent shape, stage-1 digest, conditioning
    mode, last losses.

    Args:
        model_path: e.g. ``models/model.pt``.
        network: the online network; ema: the :class:`EMA`; encoder: the ``FrozenLatentEncoder``.
        info_path: JSON side file (``None``: none).
        info: extra JSON-able fields for the side file (config values).
        evaluator: validation engine whose ``metric_name`` is recorded.
        normaliser_file: the feature normaliser the training conditions were normalised with (the prepared folder's
            ``feature_normalisation.json``); read when the handler is built (with the training data) and written
            beside ``model_path`` as ``feature_normalisation.json``, its SHA-256 recorded in the side file, so that
            inference and evaluation use - and verify - the normaliser of the model, whatever ``prepare`` did since.
        model_config: JSON record of the model keys (``custom.workflows.bundle.model_record``), stored in
            ``model.pt`` so that inference rebuilds this network without the training configs.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        network: nn.Module,
        ema: EMA | None,
        encoder: Any,
        info_path: str | os.PathLike | None = None,
        info: Mapping[str, Any] | None = None,
        evaluator: Engine | None = None,
        metric_name: str = "val_noise_mse",
        normaliser_file: str | os.PathLike | None = None,
        model_config: str | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.normaliser_bytes = None
        if normaliser_file is not None and Path(normaliser_file).is_file():
            self.normaliser_bytes = Path(normaliser_file).read_bytes()
        self.network = network
        self.ema = ema
        self.encoder = encoder
        self.info_path = None if info_path is None else Path(info_path)
        self.info = dict(info or {})
        self.evaluator = evaluator
        self.metric_name = metric_name
        self.model_config = model_config

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        def cpu_state(m: nn.Module) -> dict[str, torch.Tensor]:
            return {k: v.detach().cpu() for k, v in unwrap(m).state_dict().items()}

        online = cpu_state(self.network)
        ema = cpu_state(self.ema.ema_model) if self.ema is not None else online
        obj = {"model": ema, "network": online, "scale_factor": torch.tensor(float(self.encoder.scale_factor))}
        if self.model_config is not None:
            obj["model_config"] = self.model_config
        save_checkpoint(self.model_path, obj)
        logger.info("final model (EMA weights under 'model'): %s", self.model_path)
        norm_info: dict[str, Any] = {}
        if self.normaliser_bytes is not None:
            norm_path = self.model_path.parent / "feature_normalisation.json"
            atomic_write(norm_path, lambda p: p.write_bytes(self.normaliser_bytes))
            norm_info = {"feature_normalisation_file": norm_path.name,
                         "feature_normalisation_sha256": hashlib.sha256(self.normaliser_bytes).hexdigest()}
        if self.info_path is not None:
            net = unwrap(self.network)
            val = None
            if self.evaluator is not None and self.metric_name in self.evaluator.state.metrics:
                val = float(self.evaluator.state.metrics[self.metric_name])
            info = {
                "model_file": self.model_path.name,
                "weights": {"model": "EMA weights (use for sampling)", "network": "online weights"},
                "iteration": int(engine.state.iteration),
                "epoch": int(engine.state.epoch),
                "ema_decay": None if self.ema is None else self.ema.decay,
                "latent_channels": getattr(net, "latent_channels", None),
                "mask_latent_channels": getattr(net, "mask_latent_channels", None),
                "mask_channels": getattr(self.encoder, "mask_channels", None),
                "scale_factor": float(self.encoder.scale_factor),
                "stage1_checkpoint_sha256": getattr(self.encoder, "checkpoint_digest", None),
                "last_train_loss": loss_output(engine.state.output),
                "last_val_noise_mse": val,
                **norm_info,
                **self.info,
            }
            atomic_write_json(self.info_path, json.loads(json.dumps(info, default=str)))
