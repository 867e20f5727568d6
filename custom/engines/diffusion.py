"""Stage 2 of GCDM: the latent diffusion model, trained by the stock ``monai.engines.SupervisedTrainer``.

Pieces wired together by ``bundle/configs/train_diffusion.json``:

* :class:`FrozenLatentEncoder`: the stage-1 ``AutoencoderKL`` loaded from ``models/autoencoder.pt`` and frozen.
  Image latent ``z = scale_factor * z_mu`` — the posterior *mean*, not a sample, so a latent is a deterministic
  function of the image and can be cached. Soft-mask latent: each selected soft-mask channel (``mask_channels``,
  default ``[0, 1, 2]`` = background, breast, blurred lesion) goes through the 1-channel encoder on its own and the
  latents are concatenated: ``len(mask_channels) * latent_channels`` channels.
* :class:`LatentCache` + :func:`diffusion_dataset`: every training/validation case is encoded once and stored as
  ``<cache_dir>/<key>/<case_id>.pt`` (``{"latent", "mask_latent"}``, written atomically, read with
  ``weights_only=True``). ``<key>`` hashes the stage-1 checkpoint *content*, ``sigma``, ``image_size``,
  ``mask_channels`` and the latent definition, so a new autoencoder or mask setting never reuses stale latents; each
  file also records the SHA-256 of the prepared image and label it was computed from, so a case whose files changed
  (``prepare`` run again) is encoded again.
  With ``latent_cache: false`` the dataset holds images and soft masks and :class:`GCDMPrepareBatch` encodes each
  batch on the fly (the slow path, kept to measure what the cache buys).
* :class:`GCDMPrepareBatch` (a ``monai.engines.DiffusionPrepareBatch``): latent ``z0``, noise, timesteps, the CFG
  drop events (:func:`custom.networks.cfg_dropout_masks`) and the conditioning inputs as inferer kwargs.
* :class:`GCDMTrainInferer` (a ``monai.inferers.Inferer``): ``z_t = scheduler.add_noise(z0, noise, t)`` and the
  network call; :class:`~custom.networks.gcdm.GCDMNetwork` concatenates the (CFG-dropped) mask latent to ``z_t``
  and builds the cross-attention tokens, so training, validation and sampling share one code path.
* the loss is ``torch.nn.MSELoss`` between predicted and true noise (the target of the prepare batch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.engines import DiffusionPrepareBatch
from monai.inferers import Inferer
from monai.transforms import MapTransform
from torch import nn

from custom.checkpoints import file_sha256, load_checkpoint, load_stage1, save_checkpoint
from custom.engines.handlers import is_main_process
from custom.errors import MammoInputError
from custom.networks.conditioning import cfg_dropout_masks

__all__ = [
    "LATENT_DEFINITION",
    "FrozenLatentEncoder",
    "LatentCache",
    "EncodeLatentsd",
    "diffusion_dataset",
    "GCDMPrepareBatch",
    "check_snr_gamma",
    "check_lesion_loss_weight",
    "check_stage2_options",
    "GCDMTrainInferer",
    "latest_checkpoint",
    "file_digest",
]

logger = logging.getLogger(__name__)

#: What a cached latent is; part of the cache key (change it when the definition changes).
LATENT_DEFINITION = "scale_factor*z_mu/v1"
#: What the network predicts (``monai.networks.schedulers`` prediction types); the schedulers must agree.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: Conditioning inputs passed from the batch to the network: network argument -> batch key.
DEFAULT_CONDITION_KEYS = {"features": "features", "lesion_masks": "lesion_masks", "lesion_present": "lesion_present"}


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's content (:func:`custom.checkpoints.file_sha256`)."""
    return file_sha256(path, chunk)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class FrozenLatentEncoder(nn.Module):
    """The frozen stage-1 autoencoder, as the latent encoder/decoder of stage 2.

    Args:
        autoencoder: a ``monai.networks.nets.AutoencoderKL`` built with the stage-1 configuration.
        checkpoint: the stage-1 file (``{"autoencoder": state_dict, "scale_factor": tensor}``).
        mask_channels: soft-mask channels to encode, each on its own (default all three).
        map_location: where the checkpoint tensors are loaded.

    Raises:
        MammoInputError: the stage-1 checkpoint is missing (message names the file and says to train stage 1),
            corrupt, or from an autoencoder of another configuration (shape mismatch listed).

    Attributes:
        scale_factor: latent scale factor from stage 1.
        checkpoint_digest: SHA-256 of the checkpoint file (part of the latent-cache key).
        latent_channels: channels of one encoded image.
        mask_latent_channels: ``len(mask_channels) * latent_channels``.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        checkpoint: str | os.PathLike,
        mask_channels: Sequence[int] = (0, 1, 2),
        map_location: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.checkpoint = Path(checkpoint)
        self.scale_factor = float(load_stage1(self.checkpoint, autoencoder, map_location=map_location))
        self.checkpoint_digest = file_digest(self.checkpoint)
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.mask_channels = [int(c) for c in mask_channels]
        if not self.mask_channels or len(set(self.mask_channels)) != len(self.mask_channels):
            raise ValueError(f"FrozenLatentEncoder: mask_channels must be distinct channel indices, got {mask_channels}")
        self.latent_channels = int(getattr(autoencoder, "latent_channels", 0) or self._probe_latent_channels())
        self.mask_latent_channels = len(self.mask_channels) * self.latent_channels

    def _probe_latent_channels(self) -> int:
        return int(self.autoencoder.quant_conv_mu.out_channels)

    def train(self, mode: bool = True) -> "FrozenLatentEncoder":
        """Always stays in eval mode (frozen)."""
        return super().train(False)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` image in ``[0, 1]`` -> ``(B, latent_channels, h, w)`` latent ``scale_factor * z_mu``."""
        z_mu, _ = self.autoencoder.encode(image.float())
        return z_mu * self.scale_factor

    @torch.no_grad()
    def encode_mask(self, soft_mask: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` soft mask -> ``(B, len(mask_channels) * latent_channels, h, w)``: every selected channel
        encoded on its own (one batched call), latents concatenated in ``mask_channels`` order."""
        if soft_mask.ndim != 4 or max(self.mask_channels) >= soft_mask.shape[1]:
            raise ValueError(
                f"FrozenLatentEncoder: soft mask (B, C, H, W) with channels {self.mask_channels} expected, got "
                f"{tuple(soft_mask.shape)}"
            )
        sel = soft_mask[:, self.mask_channels]
        b, c = sel.shape[:2]
        z = self.encode(sel.reshape(b * c, 1, *sel.shape[2:]))
        return z.reshape(b, c * z.shape[1], *z.shape[2:])

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image ``(B, 1, H, W)`` clamped to ``[0, 1]``."""
        param = next(self.autoencoder.parameters())
        return self.autoencoder.decode(latent.to(param.dtype) / self.scale_factor).clamp(0.0, 1.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encode(image)


class LatentCache:
    """Per-case latents on disk, keyed by case id + stage-1 checkpoint digest + ``sigma`` + ``image_size``, each file
    valid only for the content it was computed from (SHA-256 of the prepared image and label files, stored in the file
    and compared at every use: re-running ``prepare`` re-encodes exactly the cases whose files changed).

    Args:
        cache_dir: root folder; files go to ``<cache_dir>/<key>/<case_id>.pt``.
        encoder: the :class:`FrozenLatentEncoder`.
        sigma: soft-mask sigma (part of the key).
        image_size: model image side (part of the key).
        device: where encoding runs (default: the encoder's device).

    Attributes:
        key: the 16-hex-digit cache key; ``folder``: ``<cache_dir>/<key>``.
        encoded / loaded: how many cases this object encoded / read from disk (a re-run encodes nothing).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        encoder: FrozenLatentEncoder,
        sigma: float,
        image_size: int | None,
        device: str | torch.device | None = None,
    ) -> None:
        self.encoder = encoder
        self.device = torch.device(device) if device is not None else next(encoder.parameters()).device
        spec = {
            "stage1_sha256": encoder.checkpoint_digest,
            "sigma": float(sigma),
            "image_size": None if image_size is None else int(image_size),
            "mask_channels": encoder.mask_channels,
            "latent_definition": LATENT_DEFINITION,
        }
        self.spec = spec
        self.key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = Path(cache_dir) / self.key
        self.encoded = 0
        self.loaded = 0
        self.stale = 0
        self._digests: dict[str, str] = {}
        self._lock = threading.Lock()

    def path(self, case_id: str) -> Path:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(case_id))
        return self.folder / f"{safe}.pt"

    #: the item fields a latent depends on (the soft mask is computed from the label map)
    CONTENT_KEYS = ("image", "label")

    def content_digest(self, item: Mapping[str, Any]) -> str:
        """SHA-256 of what the latents of ``item`` are computed from: the bytes of its ``image`` and ``label`` files
        (paths, or loaded ``MetaTensor`` s whose ``filename_or_obj`` names the file; other tensors: their values).
        Remembered per case id, so a re-run of ``prepare`` that changes a file changes the digest."""
        cid = str(item.get("case_id"))
        if cid in self._digests:
            return self._digests[cid]
        h = hashlib.sha256()
        for key in self.CONTENT_KEYS:
            v = item.get(key)
            name = getattr(v, "meta", {}).get("filename_or_obj") if hasattr(v, "meta") else None
            src = v if isinstance(v, (str, os.PathLike)) else name
            h.update(key.encode())
            if src is not None and Path(str(src)).is_file():
                h.update(file_digest(src).encode())
            elif v is not None:
                h.update(torch.as_tensor(v).detach().cpu().float().contiguous().numpy().tobytes())
        digest = h.hexdigest()
        self._digests[cid] = digest
        return digest

    def is_current(self, item: Mapping[str, Any]) -> bool:
        """Whether the cache holds latents of ``item`` computed from its present content."""
        digest = self.content_digest(item)  # from the item's files (remembered for the encoding that may follow)
        path = self.path(item["case_id"])
        if not path.is_file():
            return False
        try:
            obj = load_checkpoint(path, what="cached latent")
        except MammoInputError:
            return False
        return obj.get("content_sha256") == digest

    def encode(self, item: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Encode one case (``image`` ``(1, S, S)``, ``soft_mask`` ``(3, S, S)``) -> CPU latents without batch dim."""
        image = torch.as_tensor(item["image"]).unsqueeze(0).to(self.device)
        soft = torch.as_tensor(item["soft_mask"]).unsqueeze(0).to(self.device)
        with self._lock:  # one encoder forward at a time (CacheDataset may call from threads)
            latent = self.encoder.encode(image)[0].cpu()
            mask_latent = self.encoder.encode_mask(soft)[0].cpu()
            self.encoded += 1
        return {"latent": latent.contiguous(), "mask_latent": mask_latent.contiguous()}

    def load(self, case_id: str, content_sha256: str | None = None) -> dict[str, torch.Tensor] | None:
        """The cached latents of ``case_id``, or ``None`` when absent, unreadable or computed from other content
        than ``content_sha256`` (then re-encoded)."""
        path = self.path(case_id)
        if not path.is_file():
            return None
        try:
            obj = load_checkpoint(path, what="cached latent")
        except MammoInputError as err:
            logger.warning("%s; encoding again", err)
            return None
        if not {"latent", "mask_latent"} <= set(obj) or obj["mask_latent"].shape[0] != self.encoder.mask_latent_channels:
            logger.warning("%s: unexpected cached latent content; encoding again", path)
            return None
        if content_sha256 is not None and obj.get("content_sha256") != content_sha256:
            logger.info("%s: the prepared image or label changed since it was cached; encoding again", path)
            with self._lock:
                self.stale += 1
            return None
        with self._lock:
            self.loaded += 1
        return {"latent": obj["latent"], "mask_latent": obj["mask_latent"]}

    def get(self, item: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Cached latents of ``item["case_id"]``; encoded and stored (atomically) when not cached yet."""
        digest = self.content_digest(item)
        out = self.load(item["case_id"], digest)
        if out is None:
            out = self.encode(item)
            save_checkpoint(self.path(item["case_id"]), {**out, "case_id": str(item["case_id"]), **self.spec,
                                                         "content_sha256": digest})
        return out

    def warm(self, data: Sequence[Mapping[str, Any]], transform: Any) -> int:
        """Encode and store every case of ``data`` not cached yet (``transform`` loads image + soft mask).
        Rank 0 encodes first under DDP, the other ranks wait. Returns the number of cases encoded here."""
        before = self.encoded
        for d in data:  # every rank: the content digests from the item files (the loaded items no longer name them)
            self.content_digest(d)
        if not is_main_process():
            _barrier()
        else:
            missing = [d for d in data if not self.is_current(d)]
            if missing:
                from tqdm.auto import tqdm

                logger.info("latent cache %s: encoding %d of %d cases", self.folder, len(missing), len(data))
                for d in tqdm(missing, desc="encode latents", leave=False, disable=len(missing) < 8):
                    self.get(transform(dict(d)))
            _barrier()
        logger.info("latent cache %s: %d cases ready (%d encoded now)", self.folder, len(data), self.encoded - before)
        return self.encoded - before


class EncodeLatentsd(MapTransform):
    """Add ``latent`` and ``mask_latent`` to an item from a :class:`LatentCache` (encoding when not cached)."""

    def __init__(self, cache: LatentCache, case_key: str = "case_id") -> None:
        super().__init__(keys=[case_key])
        self.cache = cache
        self.case_key = case_key

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        d.update(self.cache.get(d))
        return d


def diffusion_dataset(
    data: Sequence[Mapping[str, Any]],
    image_size: int | None,
    sigma: float,
    max_lesions: int,
    latent_cache: LatentCache | None = None,
    num_workers: int = 0,
    keep_images: bool = False,
    progress: bool = False,
    extra_keys: Sequence[str] = (),
):
    """A ``monai.data.CacheDataset`` of prepared cases for stage 2 (every transform is deterministic, so the
    whole item is computed once and held in memory).

    With ``latent_cache`` the items carry ``latent`` / ``mask_latent`` from the disk cache (warmed first, rank 0
    under DDP) and, unless ``keep_images``, not the ``image``/``soft_mask`` that training no longer needs.
    Without it they carry ``image`` and ``soft_mask`` and the prepare batch encodes them per iteration. Items keep
    only tensor fields (plus ``case_id`` and ``extra_keys``), so they collate.
    """
    from monai.data import CacheDataset
    from monai.transforms import Compose, SelectItemsd

    from custom.data.training import prepared_transforms

    base = prepared_transforms(image_size=image_size, sigma=sigma, max_lesions=max_lesions)
    # flat list: a nested Compose is Randomizable, and CacheDataset stops caching at the first Randomizable
    xforms: list = list(base.transforms)
    keep = ["case_id", "features", "lesion_masks", "lesion_present", *extra_keys]
    if latent_cache is not None:
        latent_cache.warm(data, base)
        xforms.append(EncodeLatentsd(latent_cache))
        keep += ["latent", "mask_latent"]
    if latent_cache is None or keep_images:
        keep += ["image", "soft_mask"]
    xforms.append(SelectItemsd(keys=keep, allow_missing_keys=True))  # strings / None fields do not collate
    items = [dict(d) for d in data]
    return CacheDataset(items, transform=Compose(xforms), cache_rate=1.0, num_workers=num_workers or None, progress=progress)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_snr_gamma(snr_gamma: Any) -> float | None:
    """``snr_gamma``: ``None`` or a positive finite number (a boolean is refused: Python counts ``True`` as 1).

    Raises:
        MammoInputError: naming ``snr_gamma``.
    """
    if snr_gamma is not None and not (_is_number(snr_gamma) and snr_gamma > 0):
        raise MammoInputError("snr_gamma", f"must be a positive number or null, got {snr_gamma!r}")
    return None if snr_gamma is None else float(snr_gamma)


def check_lesion_loss_weight(lesion_loss_weight: Any) -> float | None:
    """``lesion_loss_weight``: ``None`` or a finite number >= 1 (a boolean is refused).

    Raises:
        MammoInputError: naming ``lesion_loss_weight``.
    """
    if lesion_loss_weight is not None and not (_is_number(lesion_loss_weight) and lesion_loss_weight >= 1):
        raise MammoInputError("lesion_loss_weight", f"must be a number >= 1 or null, got {lesion_loss_weight!r}")
    return None if lesion_loss_weight is None else float(lesion_loss_weight)


def check_stage2_options(snr_gamma: Any = None, lesion_loss_weight: Any = None, conditioner_lr_mult: Any = 1.0,
                         spatial_feature_channels: Any = 0) -> None:
    """The stage-2 loss, optimiser and network options, checked in ``train_diffusion.json``'s ``initialize``: before
    the latent cache is encoded (the prepare-batch, network and optimiser that use them are built after it).

    Raises:
        MammoInputError: naming the first bad option.
    """
    from custom.networks.gcdm import check_spatial_feature_channels
    from custom.networks.sd_weights import check_conditioner_lr_mult

    check_snr_gamma(snr_gamma)
    check_lesion_loss_weight(lesion_loss_weight)
    check_conditioner_lr_mult(conditioner_lr_mult)
    check_spatial_feature_channels(spatial_feature_channels)


class GCDMPrepareBatch(DiffusionPrepareBatch):
    """Batch -> ``(z0, noise_target, (), inferer_kwargs)`` for :class:`GCDMTrainInferer`.

    Args:
        num_train_timesteps: ``T`` of the training scheduler; timesteps are drawn uniformly from ``[0, T)``.
        p_features, p_mask, p_both: CFG drop probabilities (mutually exclusive events, see
            :func:`custom.networks.cfg_dropout_masks`).
        encoder: a :class:`FrozenLatentEncoder` for batches without cached latents (``latent_cache: false``).
        prediction_type: ``"epsilon"`` (default: the target is the noise), ``"v_prediction"`` or ``"sample"``; must
            match the schedulers' ``prediction_type``.
        scheduler: the training scheduler (needed for ``"v_prediction"``).
        seed: ``None`` for training (global RNG, CFG dropout on). An integer gives *fixed* noise and timesteps per
            case (a generator seeded by ``seed`` and the case id) and no CFG dropout: the validation setting, so the
            validation noise-MSE is comparable between evaluations.
        condition_keys: network argument -> batch key for the conditioning inputs (default features,
            lesion_masks, lesion_present).
        extra_keys: more network arguments taken from the batch (e.g. ``{"extra_concat": "masked_latent"}`` for
            inpainting, ``{"clinical": "clinical_vector"}`` for a token source).
        snr_gamma: ``None`` (default): the target is a plain tensor and every timestep weighs the same. A number
            ``gamma``: Min-SNR-gamma loss weighting (Hang et al., ICCV 2023): the target becomes
            ``(target, weight)`` with ``weight = min(SNR_t, gamma) / SNR_t`` (epsilon), ``/ (SNR_t + 1)``
            (v_prediction) or ``min(SNR_t, gamma)`` (sample), ``SNR_t = a_t / (1 - a_t)``: the same weighting of the
            implied ``z0`` error whatever the prediction target. Use it with :class:`custom.losses.WeightedMSELoss`.
        lesion_loss_weight: ``None`` (default): every latent cell weighs the same. A number ``w >= 1``: the target
            becomes ``(target, weight)`` with a per-cell weight ``1 + (w - 1) * lesion area`` ``(B, 1, h, w)`` (the
            union of the slots' lesion masks, area-pooled to the latent grid; times the Min-SNR weight when both are
            on), so the lesion, ~1 % of a mammogram's pixels, counts ``w`` times in the denoising loss. Use it with
            :class:`custom.losses.WeightedMSELoss`.

    Inferer kwargs: ``noise``, ``timesteps``, ``mask_latent``, ``drop_features``, ``drop_mask`` and the condition
    and extra keys. ``self.last_drops`` holds the last drawn ``(drop_features, drop_mask)``.
    """

    def __init__(
        self,
        num_train_timesteps: int,
        p_features: float = 0.05,
        p_mask: float = 0.05,
        p_both: float = 0.05,
        encoder: FrozenLatentEncoder | None = None,
        seed: int | None = None,
        condition_keys: Mapping[str, str] | None = None,
        extra_keys: Mapping[str, str] | None = None,
        prediction_type: str = "epsilon",
        scheduler: Any | None = None,
        snr_gamma: float | None = None,
        lesion_loss_weight: float | None = None,
    ) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name=None)
        self.lesion_loss_weight = check_lesion_loss_weight(lesion_loss_weight)
        check_snr_gamma(snr_gamma)
        if snr_gamma is not None and scheduler is None:
            raise ValueError("GCDMPrepareBatch: snr_gamma needs the training scheduler (its alphas_cumprod)")
        self.snr_gamma = None if snr_gamma is None else float(snr_gamma)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"GCDMPrepareBatch: prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if prediction_type == "v_prediction" and scheduler is None:
            raise ValueError("GCDMPrepareBatch: prediction_type='v_prediction' needs the training scheduler")
        self.prediction_type = prediction_type
        self.scheduler = scheduler
        self.p_features, self.p_mask, self.p_both = float(p_features), float(p_mask), float(p_both)
        cfg_dropout_masks(0, self.p_features, self.p_mask, self.p_both)  # validates the probabilities
        self.encoder = encoder
        self.seed = seed
        self.condition_keys = dict(DEFAULT_CONDITION_KEYS if condition_keys is None else condition_keys)
        self.extra_keys = dict(extra_keys or {})
        self.last_drops: tuple[torch.Tensor, torch.Tensor] | None = None
        self._generators: list[torch.Generator] | None = None

    def _case_generators(self, batchdata: Mapping[str, Any], b: int) -> list[torch.Generator]:
        ids = batchdata.get("case_id")
        ids = list(ids) if ids is not None else [str(i) for i in range(b)]
        return [torch.Generator().manual_seed(int(self.seed) * 1_000_003 + zlib.crc32(str(c).encode())) for c in ids]

    def get_noise(self, images: torch.Tensor) -> torch.Tensor:
        """Latent-shaped Gaussian noise (the input already is the latent); fixed per case when ``seed`` is set."""
        if self._generators is None:
            return torch.randn_like(images)
        return torch.stack([torch.randn(images.shape[1:], generator=g) for g in self._generators]).to(images)

    def get_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        if self._generators is None:
            return super().get_timesteps(images)
        t = [torch.randint(0, self.num_train_timesteps, (1,), generator=g) for g in self._generators]
        return torch.cat(t).to(images.device)

    def lesion_weight_map(self, lesion_masks: torch.Tensor, lesion_present: torch.Tensor,
                          size: Sequence[int]) -> torch.Tensor:
        """``(B, 1, h, w)`` loss weights ``1 + (lesion_loss_weight - 1) * a``: ``a`` the share of each latent cell
        covered by a lesion (the union of the present slots' ``(B, L, H, W)`` masks, area-pooled to ``size``)."""
        present = lesion_present.to(lesion_masks.dtype)[..., None, None]
        union = (lesion_masks.float() * present).amax(dim=1, keepdim=True)
        area = torch.nn.functional.adaptive_avg_pool2d(union, tuple(int(v) for v in size))
        return 1.0 + (float(self.lesion_loss_weight) - 1.0) * area

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The regression target: the noise (``"epsilon"``), ``z0`` (``"sample"``) or the velocity
        ``sqrt(a_t) * noise - sqrt(1 - a_t) * z0`` (``"v_prediction"``)."""
        if self.prediction_type == "sample":
            return images
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(images, noise, timesteps)
        return noise

    def loss_weight(self, timesteps: torch.Tensor) -> torch.Tensor:
        """``(B,)`` Min-SNR-gamma weights of ``timesteps`` (see ``snr_gamma``); ones when ``snr_gamma`` is None."""
        if self.snr_gamma is None:
            return torch.ones(timesteps.shape[0], device=timesteps.device)
        a = self.scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)[timesteps.long()]
        snr = a / (1.0 - a)
        clipped = snr.clamp(max=self.snr_gamma)
        if self.prediction_type == "v_prediction":
            w = clipped / (snr + 1.0)
        elif self.prediction_type == "sample":
            w = clipped
        else:
            w = clipped / snr
        return w.float()

    def __call__(
        self,
        batchdata: dict[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        def to(x: Any) -> Any:
            return x.to(device=device, non_blocking=non_blocking, **kwargs) if isinstance(x, torch.Tensor) else x

        if "latent" in batchdata:
            z0, mask_latent = to(batchdata["latent"]), to(batchdata["mask_latent"])
        elif self.encoder is not None:  # latent_cache: false -> encode on the fly
            enc_device = next(self.encoder.parameters()).device
            z0 = to(self.encoder.encode(batchdata["image"].to(enc_device)))
            mask_latent = to(self.encoder.encode_mask(batchdata["soft_mask"].to(enc_device)))
        else:
            raise ValueError(
                "GCDMPrepareBatch: the batch has no 'latent' (latent cache off?) and no encoder was given to encode it"
            )
        z0 = torch.as_tensor(z0).float()
        b = z0.shape[0]
        self._generators = self._case_generators(batchdata, b) if self.seed is not None else None
        try:
            noise = self.get_noise(z0)
            timesteps = self.get_timesteps(z0)
        finally:
            self._generators = None
        target = self.get_target(z0, noise, timesteps)
        weight: torch.Tensor | None = None
        if self.snr_gamma is not None:
            weight = self.loss_weight(timesteps)
        if self.lesion_loss_weight is not None:
            cells = self.lesion_weight_map(to(batchdata["lesion_masks"]), to(batchdata["lesion_present"]), z0.shape[2:])
            weight = cells if weight is None else cells * weight.view(-1, 1, 1, 1).to(cells)
        if weight is not None:
            target = (target, weight)
        if self.seed is None:
            drop_features, drop_mask = cfg_dropout_masks(b, self.p_features, self.p_mask, self.p_both, device=z0.device)
        else:
            drop_features = drop_mask = torch.zeros(b, dtype=torch.bool, device=z0.device)
        self.last_drops = (drop_features, drop_mask)
        infer_kwargs: dict[str, Any] = {
            "noise": noise,
            "timesteps": timesteps,
            "mask_latent": mask_latent,
            "drop_features": drop_features,
            "drop_mask": drop_mask,
        }
        for arg, key in {**self.condition_keys, **self.extra_keys}.items():
            if key not in batchdata:
                raise KeyError(f"GCDMPrepareBatch: batch key {key!r} (network argument {arg!r}) missing; has {sorted(batchdata)}")
            infer_kwargs[arg] = to(batchdata[key])
        return z0, target, (), infer_kwargs


class GCDMTrainInferer(Inferer):
    """Training/validation inferer: ``z_t = scheduler.add_noise(z0, noise, t)``, then the network's prediction
    ``network(z_t, t, mask_latent=..., features=..., ...)`` (the network concatenates the mask latent and builds the
    cross-attention context, see :class:`~custom.networks.gcdm.GCDMNetwork`).

    Args:
        scheduler: the training scheduler (``monai.networks.schedulers.DDPMScheduler``).
        prediction_type: what the network predicts (``"epsilon"``, ``"v_prediction"``, ``"sample"``).
        return_noise: convert the prediction into the implied noise ``eps_hat`` (for ``"v_prediction"``:
            ``sqrt(a_t) * v + sqrt(1 - a_t) * z_t``; for ``"sample"``: ``(z_t - sqrt(a_t) * x0) / sqrt(1 - a_t)``):
            the validation inferer, so that the validation metric is the noise MSE whatever the training target.
    """

    def __init__(self, scheduler: nn.Module, prediction_type: str = "epsilon", return_noise: bool = False) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"GCDMTrainInferer: prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.return_noise = bool(return_noise)

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: nn.Module, noise: torch.Tensor, timesteps: torch.Tensor, *args: Any, **cond: Any
    ) -> torch.Tensor:
        z_t = self.scheduler.add_noise(original_samples=inputs, noise=noise, timesteps=timesteps)
        pred = network(z_t, timesteps, *args, **cond)
        if not self.return_noise or self.prediction_type == "epsilon":
            return pred
        a = self.scheduler.alphas_cumprod.to(device=z_t.device, dtype=torch.float32)[timesteps.to(z_t.device)]
        a = a.view(-1, *([1] * (z_t.ndim - 1)))
        pred, z_t = pred.float(), z_t.float()
        if self.prediction_type == "v_prediction":
            return a.sqrt() * pred + (1 - a).sqrt() * z_t
        return (z_t - a.sqrt() * pred) / (1 - a).sqrt()


def latest_checkpoint(ckpt_dir: str | os.PathLike, pattern: str = "checkpoint*.pt") -> str | None:
    """The newest training checkpoint in ``ckpt_dir`` (by modification time, then name), or ``None``."""
    folder = Path(ckpt_dir)
    files = [p for p in folder.glob(pattern) if p.is_file()] if folder.is_dir() else []
    if not files:
        return None
    return str(max(files, key=lambda p: (p.stat().st_mtime_ns, p.name)))


def resume_checkpoint(ckpt_dir: str | os.PathLike, resume: bool | str | None) -> str | None:
    """Checkpoint to resume from: ``resume`` False/None -> None; True -> :func:`latest_checkpoint` (error when
    there is none); a path -> that file (error when missing). The file is verified against its ``.sha256``
    (:func:`custom.checkpoints.verify_checkpoint`) before the trainer's ``CheckpointLoader`` reads it."""
    if not resume:
        return None
    from custom.checkpoints import verify_checkpoint

    if isinstance(resume, (str, os.PathLike)) and str(resume).lower() not in ("true", "latest"):
        if not Path(resume).is_file():
            raise MammoInputError(resume, "resume checkpoint not found")
        verify_checkpoint(resume, "resume checkpoint")
        return str(resume)
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        raise MammoInputError(ckpt_dir, "resume requested but the folder holds no checkpoint*.pt")
    verify_checkpoint(path, "resume checkpoint")  # before the stock CheckpointLoader unpickles it
    return path
