"""Stage 1 of GCDM: training the AutoencoderKL with Ignite engines from :mod:`monai.engines`.

:class:`AutoencoderTrainer` is a :class:`monai.engines.Trainer` whose iteration does

1. the generator (autoencoder) step: ``L = L1(x̂, x) + kl_weight·KL + perceptual_weight·P(x̂, x)
   + adversarial_weight·G_adv(D(x̂))`` (the last term only after ``adversarial_warmup`` iterations), and
2. when the adversarial loss is active, the discriminator step on ``cat(x, x̂.detach())`` (one forward, so it
   also works with a DistributedDataParallel discriminator),

with optional bf16/fp16 autocast, ``torch.compile`` and gradient accumulation. Everything else is an Ignite/MONAI
handler wired in ``bundle/configs/train_autoencoder.json``; this module adds the handlers MONAI lacks:

* :class:`NonFiniteLossHandler` - stops training on a NaN/inf loss *before* the optimiser step, naming the iteration;
* :class:`AtomicCheckpointSaver` / :class:`ResumeCheckpointLoader` - MONAI's ``CheckpointSaver`` writes with
  ``DiskSaver(atomic=False)``; the subclass switches atomic writes on. Both can include the engine itself in the
  checkpoint (iteration/epoch), which a config cannot reference without a cycle;
* :class:`EpochSeedHandler` - reseeds the RNGs at every epoch start so a resumed run continues bit-identically;
* :class:`ReconstructionGridHandler` - PNG grid (input | reconstruction) of fixed validation images + TensorBoard;
* :class:`LossCurveRecorder` - ``loss_curve.csv`` (iteration, epoch, train loss terms, validation L1);
* :func:`compute_latent_scale_factor` / :func:`finalise_stage1` - ``1 / std`` of the training latents and the
  stage-1 deliverable ``models/autoencoder.pt`` (:func:`custom.checkpoints.save_stage1`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.engines import Trainer
from monai.engines.utils import IterationEvents, PrepareBatch, default_metric_cmp_fn
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.inferers import Inferer, SimpleInferer
from monai.losses import PatchAdversarialLoss
from monai.utils import AdversarialIterationEvents
from monai.utils.enums import CommonKeys as Keys

from custom.engines.handlers import LOSS_KEYS, NonFiniteLossError, NonFiniteLossHandler, is_main_process, unwrap
from custom.io import atomic_write
from custom.losses import kl_loss

__all__ = [
    "LOSS_KEYS",
    "AtomicCheckpointSaver",
    "AutoencoderTrainer",
    "EpochSeedHandler",
    "ImagePrepareBatch",
    "LossCurveRecorder",
    "NonFiniteLossError",
    "NonFiniteLossHandler",
    "ReconstructionGridHandler",
    "ReconstructionInferer",
    "ResumeCheckpointLoader",
    "compute_latent_scale_factor",
    "finalise_stage1",
    "handlers_for_rank",
    "is_main_process",
    "loss_terms",
    "unwrap",
]

logger = logging.getLogger(__name__)



def handlers_for_rank(handlers: Sequence | None) -> list:
    """The trainer handlers this process should attach: all of them on rank 0 (or without torch.distributed); on
    other ranks only those every rank needs - resuming (:class:`ResumeCheckpointLoader`), per-epoch seeding, the
    non-finite-loss stop, the LR schedule and validation (MONAI's metric handlers all-gather their buffers, so
    every rank must run the evaluator on its shard; the evaluator's own handlers are rank 0's). Checkpoint saving,
    logging, TensorBoard, the loss curve and the progress bar run on rank 0 only."""
    handlers = [h for h in (handlers or []) if h is not None]
    if is_main_process():
        return handlers
    from monai.handlers import LrScheduleHandler, ValidationHandler

    every_rank = (CheckpointLoader, EpochSeedHandler, NonFiniteLossHandler, LrScheduleHandler, ValidationHandler)
    return [h for h in handlers if isinstance(h, every_rank)]


def loss_terms(output: Any) -> dict[str, float]:
    """``{name: float}`` of the loss terms in a trainer output, a dict or its decollated list (the scalars are the same
    in every item) — the ``output_transform`` for Stats/TensorBoard handlers."""
    if isinstance(output, list) and output:
        output = output[0]
    if not isinstance(output, Mapping):
        return {}
    return {k: float(output[k]) for k in LOSS_KEYS if k in output and output[k] is not None}


class ImagePrepareBatch(PrepareBatch):
    """``(image, image)`` from a batch dict: the autoencoder's input is its own target.

    Args:
        image_key: the image entry of the batch.
        mask_key, mask_prob: with ``mask_prob > 0``, each sample is replaced with probability ``mask_prob`` by one
            uniformly chosen channel of ``batch[mask_key]`` (the soft mask ``(B, 3, H, W)``). Stage 2 encodes every
            soft-mask channel with this 1-channel autoencoder, so it should have seen such inputs. The draws use the
            torch RNG (reseeded per epoch by :class:`EpochSeedHandler`), the same number every batch.
        crop_size: train on one random ``crop_size x crop_size`` window per sample instead of the whole image
            (``None``: whole images). The autoencoder is fully convolutional, so it is trained on windows and used
            on whole images; a 64-pixel window costs a quarter of a 128-pixel image, so the same time buys four
            times the optimiser steps (measured: stage 1 at 128 px reached the 64-px model's quality only with
            crops inside the ``make train`` budget). Offsets come from the torch RNG (2 draws per sample), so
            resumed runs see the same windows.
    """

    def __init__(self, image_key: str = "image", mask_key: str | None = None, mask_prob: float = 0.0,
                 crop_size: int | None = None):
        if not 0.0 <= float(mask_prob) <= 1.0:
            raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
        if crop_size is not None and int(crop_size) < 1:
            raise ValueError(f"crop_size must be a positive number of pixels or None, got {crop_size}")
        self.image_key, self.mask_key, self.mask_prob = image_key, mask_key, float(mask_prob)
        self.crop_size = None if crop_size is None else int(crop_size)

    def _crop(self, img: torch.Tensor) -> torch.Tensor:
        """One random ``crop_size`` window per sample of ``(B, C, H, W)``."""
        c = self.crop_size
        b, _, h, w = img.shape
        if c is None or (c >= h and c >= w):
            return img
        if c > h or c > w:
            raise ValueError(f"crop_size {c} is larger than the {h}x{w} training images")
        ys = torch.randint(0, h - c + 1, (b,))
        xs = torch.randint(0, w - c + 1, (b,))
        return torch.stack([img[i, :, int(y) : int(y) + c, int(x) : int(x) + c] for i, (y, x) in enumerate(zip(ys, xs))])

    @staticmethod
    def _tensor(x: Any) -> torch.Tensor:
        x = torch.as_tensor(x)
        return x.as_tensor() if hasattr(x, "as_tensor") else x

    def __call__(self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs):
        if not isinstance(batchdata, Mapping) or self.image_key not in batchdata:
            raise KeyError(f"batch has no {self.image_key!r} entry")
        img = self._tensor(batchdata[self.image_key])
        if self.mask_prob > 0 and self.mask_key is not None:
            if self.mask_key not in batchdata:
                raise KeyError(f"mask_prob > 0 but the batch has no {self.mask_key!r} entry")
            masks = self._tensor(batchdata[self.mask_key])
            b, c = masks.shape[:2]
            use = torch.rand(b) < self.mask_prob
            channel = torch.randint(0, c, (b,))
            if bool(use.any()):
                chosen = masks[torch.arange(b), channel].unsqueeze(1).to(img.dtype)
                img = torch.where(use.view(b, *([1] * (img.ndim - 1))), chosen, img)
        img = self._crop(img)
        img = img.to(device=device, non_blocking=non_blocking, **kwargs)
        return img, img


class ReconstructionInferer(Inferer):
    """``network.reconstruct(x)``: decode the latent mean (deterministic) - the evaluator's prediction."""

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        return unwrap(network).reconstruct(inputs)


class AutoencoderTrainer(Trainer):
    """AutoencoderKL trainer: L1 + KL (+ perceptual) (+ patch-adversarial after a warm-up), see the module docstring.

    Args:
        device, max_epochs, train_data_loader, epoch_length, non_blocking, iteration_update, key_train_metric,
        additional_metrics, metric_cmp_fn, train_handlers, event_names, event_to_attr, decollate, to_kwargs:
            as in :class:`monai.engines.SupervisedTrainer` (``decollate`` defaults to ``False`` here: the output
            holds scalar loss terms, not per-sample predictions).
        network: the ``AutoencoderKL`` (possibly wrapped in DistributedDataParallel); ``forward`` must return
            ``(reconstruction, z_mu, z_sigma)``.
        optimizer: optimiser of the autoencoder.
        prepare_batch: batch -> ``(image, target)``; default :class:`ImagePrepareBatch`.
        recon_loss: ``"l1"``, ``"l2"`` or a callable ``(reconstruction, target) -> scalar``.
        kl_weight: weight of the KL term.
        perceptual_loss, perceptual_weight: an ``(input, target) -> scalar`` module (e.g.
            :class:`custom.losses.LocalPerceptualLoss`) and its weight; off when ``None`` or weight 0.
        discriminator, d_optimizer: a ``PatchDiscriminator`` (possibly DDP-wrapped) and its optimiser.
        adversarial_loss: default ``PatchAdversarialLoss(criterion="least_squares")``.
        adversarial_weight: weight of the generator's adversarial term; 0 disables the discriminator entirely.
        adversarial_warmup: iterations ``1..adversarial_warmup`` train without the adversarial terms; from
            iteration ``adversarial_warmup + 1`` on the generator term and the discriminator step are active.
        amp: autocast the forward passes with ``amp_dtype`` (``torch.bfloat16`` default; ``torch.float16`` adds
            gradient scalers). Losses are computed in float32.
        compile, compile_kwargs: ``torch.compile`` the autoencoder's forward (checkpoints keep the plain module).
        accumulation_steps: optimiser step every N iterations (and at the end of each epoch); losses are divided
            by N before ``backward``, the logged values are not.
        optim_set_to_none: ``zero_grad(set_to_none=...)``.
        inferer: runs the autoencoder, ``inferer(images, network) -> (reconstruction, z_mu, z_sigma)`` (default
            ``SimpleInferer``: ``network(images)``); the bundle's ``train#inferer``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        recon_loss: str | Callable = "l1",
        kl_weight: float = 1e-6,
        perceptual_loss: Callable | None = None,
        perceptual_weight: float = 0.0,
        discriminator: torch.nn.Module | None = None,
        d_optimizer: torch.optim.Optimizer | None = None,
        adversarial_loss: Callable | None = None,
        adversarial_weight: float = 0.0,
        adversarial_warmup: int = 0,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable | None = None,
        iteration_update: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        amp_dtype: torch.dtype | str = torch.bfloat16,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = False,
        optim_set_to_none: bool = False,
        to_kwargs: dict | None = None,
        compile: bool = False,
        compile_kwargs: dict | None = None,
        accumulation_steps: int = 1,
        inferer: Inferer | None = None,
    ) -> None:
        if int(accumulation_steps) < 1:
            raise ValueError(f"accumulation_steps must be a positive integer, got {accumulation_steps!r}")
        if adversarial_weight < 0 or kl_weight < 0 or perceptual_weight < 0:
            raise ValueError("loss weights must be non-negative")
        if adversarial_weight > 0 and (discriminator is None or d_optimizer is None):
            raise ValueError("adversarial_weight > 0 needs a discriminator and a d_optimizer")
        if perceptual_weight > 0 and perceptual_loss is None:
            raise ValueError("perceptual_weight > 0 needs a perceptual_loss (set perceptual_network in the config)")
        if isinstance(amp_dtype, str):
            amp_dtype = getattr(torch, amp_dtype.replace("torch.", ""))
        event_names = list(event_names or []) + [AdversarialIterationEvents]
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch if prepare_batch is not None else ImagePrepareBatch(),
            iteration_update=iteration_update,
            postprocessing=None,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=None,  # attached at the end of __init__, once the trainer is complete
            amp=amp,
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=decollate,
            to_kwargs=to_kwargs,
        )
        self.network = network
        self.forward_network = torch.compile(network, **(compile_kwargs or {})) if compile else network
        self.inferer = inferer or SimpleInferer()
        self.compile = compile
        self.optimizer = optimizer
        if isinstance(recon_loss, str):
            fns = {"l1": torch.nn.functional.l1_loss, "l2": torch.nn.functional.mse_loss}
            if recon_loss.lower() not in fns:
                raise ValueError(f"recon_loss must be 'l1', 'l2' or a callable, got {recon_loss!r}")
            recon_loss = fns[recon_loss.lower()]
        self.recon_loss = recon_loss
        self.kl_weight = float(kl_weight)
        self.perceptual_loss = perceptual_loss if perceptual_weight > 0 else None
        self.perceptual_weight = float(perceptual_weight)
        self.discriminator = discriminator
        self.d_optimizer = d_optimizer
        self.adversarial_loss = adversarial_loss or PatchAdversarialLoss(criterion="least_squares")
        self.adversarial_weight = float(adversarial_weight)
        self.adversarial_warmup = int(adversarial_warmup)
        self.amp_dtype = amp_dtype
        self.accumulation_steps = int(accumulation_steps)
        self.optim_set_to_none = optim_set_to_none
        self.g_scaler: torch.amp.GradScaler | None = None
        self.d_scaler: torch.amp.GradScaler | None = None
        if train_handlers is not None:
            self._register_handlers(train_handlers)

    # ------------------------------------------------------------------------------------------------ helpers
    def run(self) -> None:  # type: ignore[override]
        """Run (or continue) training. Gradient scalers only for float16 autocast (bf16 needs none)."""
        fp16 = self.amp and self.amp_dtype == torch.float16
        device_type = torch.device(self.state.device).type if self.state.device is not None else "cpu"
        self.g_scaler = torch.amp.GradScaler(device_type) if fp16 else None
        self.d_scaler = torch.amp.GradScaler(device_type) if fp16 else None
        self.scaler = self.g_scaler
        from monai.engines.workflow import Workflow

        Workflow.run(self)

    def adversarial_active(self, iteration: int | None = None) -> bool:
        """Whether the adversarial terms are used at ``iteration`` (default: the current one)."""
        it = self.state.iteration if iteration is None else iteration
        return self.adversarial_weight > 0 and self.discriminator is not None and it > self.adversarial_warmup

    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        device_type = torch.device(self.state.device).type if self.state.device is not None else "cpu"
        return torch.autocast(device_type, dtype=self.amp_dtype)

    def _accumulation_flags(self) -> tuple[bool, bool]:
        acc = self.accumulation_steps
        if acc == 1:
            return True, True
        epoch_length = self.state.epoch_length
        if epoch_length is not None:
            local = (self.state.iteration - 1) % epoch_length
            return local % acc == 0, (local + 1) % acc == 0 or (local + 1) == epoch_length
        local = self.state.iteration - 1
        return local % acc == 0, (local + 1) % acc == 0

    @staticmethod
    def _backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler, acc: int, step: bool) -> None:
        loss = loss / acc if acc > 1 else loss
        if scaler is not None:
            scaler.scale(loss).backward()
            if step:
                scaler.step(optimizer)
                scaler.update()
        else:
            loss.backward()
            if step:
                optimizer.step()

    # ------------------------------------------------------------------------------------------------ iteration
    def _iteration(self, engine: AutoencoderTrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        images, targets = batch[0], batch[1]
        zero_grad, step = engine._accumulation_flags()
        acc = engine.accumulation_steps
        adversarial = engine.adversarial_active()

        engine.network.train()
        if zero_grad:
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with engine._autocast():
            recon, z_mu, z_sigma = engine.inferer(images, engine.forward_network)
        engine.state.output = {Keys.IMAGE: images, Keys.LABEL: targets, Keys.PRED: recon.detach()}
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)

        recon32 = recon.float()
        terms: dict[str, torch.Tensor] = {"recon_loss": engine.recon_loss(recon32, targets.float()).mean(),
                                          "kl_loss": kl_loss(z_mu, z_sigma)}
        total = terms["recon_loss"] + engine.kl_weight * terms["kl_loss"]
        if engine.perceptual_loss is not None:
            with engine._autocast():
                terms["perceptual_loss"] = engine.perceptual_loss(recon32, targets.float()).float()
            total = total + engine.perceptual_weight * terms["perceptual_loss"]
        if adversarial:
            d_plain = unwrap(engine.discriminator)
            d_plain.train()
            # generator term: D's parameters are constants here (no grads into D; D is not called through DDP)
            requires = [p.requires_grad for p in d_plain.parameters()]
            for p in d_plain.parameters():
                p.requires_grad_(False)
            try:
                with engine._autocast():
                    logits_fake = d_plain(recon32.contiguous())[-1]
            finally:
                for p, r in zip(d_plain.parameters(), requires):
                    p.requires_grad_(r)
            terms["g_adv_loss"] = engine.adversarial_loss(logits_fake.float(), target_is_real=True, for_discriminator=False)
            total = total + engine.adversarial_weight * terms["g_adv_loss"]
        engine.state.output[Keys.LOSS] = total
        engine.state.output.update(terms)
        engine.state.output["adversarial_active"] = adversarial
        engine.fire_event(IterationEvents.LOSS_COMPLETED)  # NonFiniteLossHandler checks here, before any update

        engine._backward_step(total, engine.optimizer, engine.g_scaler, acc, step)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)

        if adversarial:
            engine.discriminator.train()
            if zero_grad:
                engine.d_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
            n = targets.shape[0]
            with engine._autocast():
                logits = engine.discriminator(torch.cat([targets.float(), recon32.detach()], 0).contiguous())[-1]
            logits = logits.float()
            d_loss = 0.5 * (engine.adversarial_loss(logits[:n], target_is_real=True, for_discriminator=True)
                            + engine.adversarial_loss(logits[n:], target_is_real=False, for_discriminator=True))
            engine.state.output["d_loss"] = d_loss
            engine.fire_event(AdversarialIterationEvents.DISCRIMINATOR_LOSS_COMPLETED)
            engine._backward_step(d_loss, engine.d_optimizer, engine.d_scaler, acc, step)
            engine.fire_event(AdversarialIterationEvents.DISCRIMINATOR_BACKWARD_COMPLETED)

        for k in LOSS_KEYS:
            if k in engine.state.output and isinstance(engine.state.output[k], torch.Tensor):
                engine.state.output[k] = engine.state.output[k].detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


# ---------------------------------------------------------------------------------------------------- handlers
class EpochSeedHandler:
    """Reseed python/numpy/torch (CPU and CUDA) at every ``EPOCH_STARTED`` with ``seed + 1000 * epoch + rank``
    (RNGs only; cuDNN flags are left as they are).

    With a sampler whose order depends only on the epoch (``DistributedSampler.set_epoch``, which MONAI's workflow
    calls), a run resumed at an epoch boundary then sees the same data order and the same latent-sampling noise as
    an uninterrupted run.
    """

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        seed = (self.seed + 1000 * int(engine.state.epoch) + rank) % (2**32)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # also seeds every CUDA device


def _with_engine(objects: Mapping, engine: Engine, engine_key: str | None) -> None:
    if engine_key is not None:
        objects[engine_key] = engine  # type: ignore[index]


class _ChecksumSaveHandler(BaseSaveHandler):
    """Wraps the ignite ``DiskSaver`` of a MONAI ``CheckpointSaver``: after each (atomic) save it writes the
    checkpoint's ``.sha256`` file (:func:`custom.checkpoints.write_checksum`) with the mode the umask gives,
    and removes it with the checkpoint."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:  # dirname, filename, ... of the wrapped saver
        return getattr(self.inner, name)

    def _path(self, filename: str) -> Path:
        name = getattr(self.inner, "filename", None) or filename
        return Path(self.inner.dirname) / name

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        from custom.checkpoints import write_checksum
        from custom.io import chmod_default

        self.inner(checkpoint, filename, metadata)
        path = self._path(filename)
        chmod_default(path)  # ignite's atomic save makes the file 0600 (+ read bits): follow the umask instead
        write_checksum(path)

    def remove(self, filename: str) -> None:
        from custom.checkpoints import checksum_path

        self.inner.remove(filename)
        checksum_path(self._path(filename)).unlink(missing_ok=True)


class AtomicCheckpointSaver(CheckpointSaver):
    """:class:`monai.handlers.CheckpointSaver` writing atomically (temporary file + ``os.replace``), with a checksum
    file beside every checkpoint, and ``n_saved`` kept across resumed runs.

    MONAI constructs its ignite ``DiskSaver`` with ``atomic=False`` (an old permissions concern; ignite >= 0.4.11
    adds group/other read permission after the rename); this subclass switches ``atomic`` on, so an interrupted
    save never leaves a truncated checkpoint, and writes ``<file>.sha256`` after each save so that a damaged file is
    refused at load (:func:`custom.checkpoints.verify_checkpoint`). ignite's ``Checkpoint`` only counts the
    files saved by the running process, so a resumed run would keep ``n_saved`` *more* files each time; the
    interval checkpoints already in ``save_dir`` (same prefix) are registered at start, oldest first, so the oldest
    are deleted as usual. ``engine_key`` (default ``"trainer"``) adds the engine it is attached to into the
    checkpoint - the trainer's iteration/epoch, needed to resume - which a bundle config cannot reference from its
    own handler list without a cycle. Other arguments as in ``CheckpointSaver``.
    """

    def __init__(self, save_dir: str, save_dict: dict, engine_key: str | None = "trainer", **kwargs: Any):
        super().__init__(save_dir=save_dir, save_dict=dict(save_dict), **kwargs)
        self.engine_key = engine_key
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                ckpt.save_handler._atomic = True
                ckpt.save_handler = _ChecksumSaveHandler(ckpt.save_handler)

    def _register_existing(self) -> None:
        """Put the interval checkpoints of an earlier run (``<prefix>_<name>_<score_name>=<n>.pt``) into ignite's
        bookkeeping, so that ``n_saved`` counts them."""
        ckpt = self._interval_checkpoint
        if ckpt is None or ckpt.n_saved is None or ckpt._saved:
            return
        prefix = f"{ckpt.filename_prefix}_" if ckpt.filename_prefix else ""
        pattern = re.compile(re.escape(prefix) + r"(?:[A-Za-z0-9]+_)?" + re.escape(str(ckpt.score_name)) + r"=(\d+)\.pt$")
        found = []
        for p in Path(self.save_dir).glob("*.pt") if Path(self.save_dir).is_dir() else []:
            m = pattern.fullmatch(p.name)
            if m:
                found.append(Checkpoint.Item(int(m.group(1)), p.name))
        ckpt._saved = sorted(found, key=lambda it: it.priority)
        if found:
            logger.info("%d checkpoint(s) of an earlier run in %s count towards n_saved=%d", len(found), self.save_dir,
                        ckpt.n_saved)

    def attach(self, engine: Engine) -> None:
        _with_engine(self.save_dict, engine, self.engine_key)
        self._register_existing()
        super().attach(engine)

    def _delete_previous_final_ckpt(self) -> None:
        # MONAI deletes the previous final checkpoint *before* writing the new one; with a fixed final filename that
        # deletes the only good copy when the new save then fails (ignite records a save before attempting it).
        # The atomic save replaces the fixed file anyway, so only forget the bookkeeping entry.
        if self._final_checkpoint is not None and self._final_filename is not None:
            self._final_checkpoint._saved.clear()
            return
        super()._delete_previous_final_ckpt()


class ResumeCheckpointLoader(CheckpointLoader):
    """:class:`monai.handlers.CheckpointLoader` (``torch.load(weights_only=True)``) that also restores the engine it
    is attached to from the checkpoint's ``engine_key`` entry (see :class:`AtomicCheckpointSaver`).

    Raises (at engine start): :class:`custom.errors.MammoInputError` naming ``load_path`` when it does not exist.
    """

    def __init__(self, load_path: str, load_dict: dict, engine_key: str | None = "trainer", **kwargs: Any):
        super().__init__(load_path=str(load_path), load_dict=dict(load_dict), **kwargs)
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        _with_engine(self.load_dict, engine, self.engine_key)
        super().attach(engine)

    def __call__(self, engine: Engine) -> None:
        from custom.checkpoints import verify_checkpoint
        from custom.errors import MammoInputError

        if not os.path.isfile(self.load_path):
            raise MammoInputError(self.load_path, "resume checkpoint not found (resume: true needs the training-state "
                                                  "file of an earlier run, config key resume_checkpoint)")
        verify_checkpoint(self.load_path, "resume checkpoint")
        try:
            super().__call__(engine)
        except Exception as err:
            raise MammoInputError(self.load_path, f"resume checkpoint does not fit this training "
                                                  f"({type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]})") from None


def _to_uint8(img: torch.Tensor | np.ndarray) -> np.ndarray:
    a = img.detach().float().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img, dtype=np.float32)
    a = np.squeeze(a)
    if a.ndim != 2:
        raise ValueError(f"reconstruction grid needs 2D single-channel images, got shape {a.shape}")
    return (np.clip(np.nan_to_num(a), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def make_reconstruction_grid(images: Sequence, reconstructions: Sequence, min_tile: int = 128, gap: int = 2) -> np.ndarray:
    """``uint8 (rows·H, 2·W)`` grid, one row per image: input | reconstruction (values clipped to [0, 1])."""
    if not images:
        raise ValueError("no images for the reconstruction grid")
    rows = []
    for x, y in zip(images, reconstructions):
        a, b = _to_uint8(x), _to_uint8(y)
        k = max(1, int(math.ceil(min_tile / max(a.shape))))
        if k > 1:
            a, b = np.kron(a, np.ones((k, k), np.uint8)), np.kron(b, np.ones((k, k), np.uint8))
        sep = np.full((a.shape[0], gap), 255, np.uint8)
        rows.append(np.concatenate([a, sep, b], axis=1))
    hsep = np.full((gap, rows[0].shape[1]), 255, np.uint8)
    out = [rows[0]]
    for r in rows[1:]:
        out += [hsep, r]
    return np.concatenate(out, axis=0)


class ReconstructionGridHandler:
    """Evaluator handler: after each validation run, write a PNG grid (input | reconstruction) of the first
    ``num_images`` validation images (the validation loader is not shuffled, so they are fixed) to
    ``<output_dir>/reconstructions/epoch_XXXX.png`` and ``<output_dir>/reconstruction_latest.png``, and the same
    grid to TensorBoard (tag ``tag``, step = training epoch) when ``tensorboard`` is true.
    """

    def __init__(self, output_dir: str, num_images: int = 4, tensorboard: bool = True, tag: str = "val_reconstruction",
                 image_key: str = Keys.IMAGE, pred_key: str = Keys.PRED, enabled: bool = True):
        self.output_dir = Path(output_dir)
        self.num_images, self.tensorboard, self.tag = int(num_images), tensorboard, tag
        self.image_key, self.pred_key, self.enabled = image_key, pred_key, enabled
        self._images: list = []
        self._preds: list = []
        self._writer = None
        self.last_path: Path | None = None

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self._images, self._preds = [], []

    def _collect(self, engine: Engine) -> None:
        out = engine.state.output
        items = out if isinstance(out, list) else [out]
        for item in items:
            if len(self._images) >= self.num_images or not isinstance(item, Mapping):
                break
            x, y = item.get(self.image_key), item.get(self.pred_key)
            if x is None or y is None:
                continue
            x = torch.as_tensor(x)
            y = torch.as_tensor(y)
            if x.ndim == 4:  # not decollated: a batch
                for xi, yi in zip(x, y):
                    if len(self._images) < self.num_images:
                        self._images.append(xi.detach().cpu())
                        self._preds.append(yi.detach().cpu())
            else:
                self._images.append(x.detach().cpu())
                self._preds.append(y.detach().cpu())

    def _write(self, engine: Engine) -> None:
        if not self._images:
            return
        from PIL import Image

        grid = make_reconstruction_grid(self._images, self._preds)
        epoch = int(engine.state.epoch)
        path = self.output_dir / "reconstructions" / f"epoch_{epoch:04d}.png"
        for p in (path, self.output_dir / "reconstruction_latest.png"):
            atomic_write(p, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
        self.last_path = path
        if self.tensorboard:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.output_dir))
            self._writer.add_image(self.tag, grid[None], global_step=epoch, dataformats="CHW")
            self._writer.flush()


class LossCurveRecorder:
    """Trainer handler writing ``<output_dir>/<filename>`` (CSV): one row per iteration with ``iteration, epoch,
    train_loss`` and the individual terms, plus ``val_loss`` (the evaluator's ``metric_name``) on the iterations
    after which validation ran. Rewritten atomically at every epoch end and at completion; a resumed run keeps the
    rows up to the iteration it resumes from.
    """

    COLUMNS = ("iteration", "epoch", "train_loss", "recon_loss", "kl_loss", "perceptual_loss", "g_adv_loss", "d_loss",
               "val_loss")

    def __init__(self, output_dir: str, evaluator: Engine | None = None, metric_name: str = "val_l1",
                 filename: str = "loss_curve.csv"):
        self.path = Path(output_dir) / filename
        self.evaluator, self.metric_name = evaluator, metric_name
        self.rows: dict[int, dict[str, Any]] = {}
        self._trainer: Engine | None = None

    def attach(self, engine: Engine) -> None:
        self._trainer = engine
        engine.add_event_handler(Events.STARTED, self._load_existing)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._record)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)
        engine.add_event_handler(Events.COMPLETED, self.write)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.COMPLETED, self._record_validation)

    def _load_existing(self, engine: Engine) -> None:
        self.rows = {}
        start = int(engine.state.iteration)
        if start == 0 or not self.path.is_file():
            return
        with open(self.path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                try:
                    it = int(row["iteration"])
                except (KeyError, ValueError):
                    continue
                if it <= start:
                    self.rows[it] = {k: v for k, v in row.items() if k in self.COLUMNS}

    def _record(self, engine: Engine) -> None:
        row = {"iteration": engine.state.iteration, "epoch": engine.state.epoch}
        terms = loss_terms(engine.state.output)
        row["train_loss"] = terms.pop("loss", None)
        row.update(terms)
        self.rows[engine.state.iteration] = row

    def _record_validation(self, evaluator: Engine) -> None:
        if self._trainer is None or self.metric_name not in evaluator.state.metrics:
            return
        it = int(self._trainer.state.iteration)
        row = self.rows.setdefault(it, {"iteration": it, "epoch": self._trainer.state.epoch})
        row["val_loss"] = float(evaluator.state.metrics[self.metric_name])

    def write(self, engine: Engine | None = None) -> Path:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.COLUMNS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for it in sorted(self.rows):
            w.writerow({k: ("" if v is None else v) for k, v in self.rows[it].items()})
        text = buf.getvalue()
        atomic_write(self.path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return self.path


# ---------------------------------------------------------------------------------------------------- scale factor
@torch.no_grad()
def compute_latent_scale_factor(
    autoencoder: torch.nn.Module,
    data_loader: Iterable,
    device: str | torch.device = "cpu",
    latents: str = "z_mu",
    image_key: str = "image",
    max_batches: int | None = None,
) -> float:
    """``1 / std`` of the autoencoder's latents over ``data_loader`` (one std over all latent elements: batch,
    channels and space, as in Stable Diffusion / MONAI's latent diffusion tutorials).

    Args:
        latents: ``"z_mu"`` - the encoder's posterior mean (deterministic; default), or ``"sample"`` - sampled
            latents ``z_mu + z_sigma * eps`` (what ``AutoencoderKL.encode_stage_2_inputs`` returns).

    Raises:
        ValueError: an unknown ``latents`` or no data; RuntimeError: a zero or non-finite std.
    """
    if latents not in ("z_mu", "sample"):
        raise ValueError(f"latents must be 'z_mu' or 'sample', got {latents!r}")
    net = unwrap(autoencoder)
    was_training = net.training
    net.eval()
    n, s, ss = 0, 0.0, 0.0
    try:
        for i, batch in enumerate(data_loader):
            if max_batches is not None and i >= max_batches:
                break
            x = batch[image_key] if isinstance(batch, Mapping) else batch
            x = (x.as_tensor() if hasattr(x, "as_tensor") else x).to(device)
            z_mu, z_sigma = net.encode(x)
            z = z_mu if latents == "z_mu" else net.sampling(z_mu, z_sigma)
            z = z.double()
            n += z.numel()
            s += float(z.sum())
            ss += float((z * z).sum())
    finally:
        net.train(was_training)
    if n < 2:
        raise ValueError("no latents to compute the scale factor from (empty training set?)")
    var = (ss - s * s / n) / (n - 1)
    std = math.sqrt(max(var, 0.0))
    if not (std > 0 and math.isfinite(std)):
        raise RuntimeError(f"latent std is {std}: cannot compute a scale factor (collapsed or diverged autoencoder)")
    return 1.0 / std


def finalise_stage1(
    autoencoder: torch.nn.Module,
    data_loader: Iterable,
    output_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    latents: str = "z_mu",
    summary_dir: str | os.PathLike | None = None,
    model_config: str | None = None,
) -> float | None:
    """After training: compute the latent scale factor over ``data_loader`` (the training set) and write the
    stage-1 file ``output_path`` with :func:`custom.checkpoints.save_stage1`.

    Under ``torch.distributed`` only rank 0 computes and writes; the other ranks wait at a barrier and get ``None``.
    ``model_config`` (JSON record of the model keys) is stored in the file for later stages to check.
    With ``summary_dir`` a ``stage1_summary.json`` (scale factor, latent kind, latent shape) is written there too.
    """
    from custom.checkpoints import save_stage1
    from custom.io import atomic_write_json

    distributed = dist.is_available() and dist.is_initialized()
    scale: float | None = None
    if is_main_process():
        net = unwrap(autoencoder)
        scale = compute_latent_scale_factor(net, data_loader, device=device, latents=latents)
        save_stage1(output_path, net, scale, model_config=model_config)
        logger.info("latent scale factor 1/std(%s) = %.6f; stage-1 autoencoder written to %s", latents, scale, output_path)
        if summary_dir is not None:
            atomic_write_json(Path(summary_dir) / "stage1_summary.json",
                              {"stage1_checkpoint": str(output_path), "scale_factor": scale, "latents": latents})
    if distributed:
        dist.barrier()
    return scale
