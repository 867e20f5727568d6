"""GPU check of the paper-scale model: ``python3 -m custom.gpu_check`` (``make gpu-check``).

Runs on one CUDA device with random Stable-Diffusion-shaped weights (nothing is downloaded or read from disk except
the bundle configs) and prints one table, which it also writes into ``bundle/docs/benchmarks.md`` between the
``<!-- gpu-check -->`` markers, with the device named. Steps:

1. the device's bf16 GEMM peak, measured (an ``8192 x 8192 x 8192`` bf16 matrix product, mean of 10 after 3 warm-ups);
2. stage-2 training steps of the paper configuration (``common.json`` + ``train_diffusion.json`` +
   ``paper.json``, read as plain JSON, later files overriding earlier top-level keys) in bf16 autocast on cached
   latents (random ``(B, 4, 32, 32)`` image latents and ``(B, 4, 32, 32)`` soft-mask latents: the SD VAE's shapes at
   256²) at GCDM's per-GPU batch size 32: the full ``GCDMNetwork`` (SD-v1-shaped UNet with 4 + 4 input channels,
   frozen CLIP ViT-L/14 mask encoder, gated fusion), AdamW with the conditioner at ``conditioner_lr_mult`` × the
   learning rate, CFG drops → images/s, peak memory, and model FLOP utilisation = FLOPs of one step (counted by
   ``torch.utils.flop_counter.FlopCounterMode``: matrix products, convolutions, attention, forward + backward) ×
   steps / time / the measured bf16 GEMM peak;
3. sampling 8 images with 50 DDIM steps and classifier-free guidance (``custom.engines.sampling.ddim_sample``,
   the network called at every step as the product does) plus the SD-shaped VAE decoder → s/image;
4. the UNet alone, MONAI ``DiffusionModelUNet`` against a diffusers ``UNet2DConditionModel`` of the identical
   configuration (same inputs, same 1-token 768-d context): a bf16 training step and a CFG-batched sampling forward,
   as a MONAI/diffusers time ratio (diffusers is optional: the row says so when it cannot be imported);
5. a DDP run of a few training steps launched with ``torch.distributed.run`` over all devices present (one process
   per device; a 1-GPU machine runs one process, which still exercises the DDP wrapping and the NCCL all-reduce).

On a machine without CUDA it refuses (exit status 2) unless ``--cpu-smoke`` is given: then everything runs with tiny
shapes on the CPU in fp32 (DDP over gloo), which is what the test suite checks; its figures mean nothing.

Dependencies: torch, monai, transformers (+ diffusers optionally). A GPU machine without the project's virtual
environment gets monai and diffusers as pure-python copies from ``make gpu-site`` (folder ``.gpu_site``, put on
``PYTHONPATH`` by ``make gpu-check``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "bundle" / "configs"
PAPER_CONFIGS = ("common.json", "train_diffusion.json", "paper.json")
BEGIN = "<!-- gpu-check:begin -->"
END = "<!-- gpu-check:end -->"
#: GCDM trained with 32 images per GPU on 2 GPUs.
GCDM_BATCH_PER_GPU = 32
#: SD's KL-f8 VAE: 4 latent channels, 8x downsampling.
SD_LATENT_CHANNELS = 4
#: Tiny shapes of ``--cpu-smoke`` (same structure: 4 levels, attention on the first three, 2 res blocks).
SMOKE_UNET = {"channels": [8, 8, 16, 16], "attention_levels": [True, True, True, False], "num_res_blocks": 2,
              "num_head_channels": [4, 4, 8, 8], "norm_num_groups": 4, "transformer_num_layers": 1}
SMOKE_CLIP = {"image_size": 32, "patch_size": 16, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 32, "projection_dim": 16, "output": "projected"}
SMOKE_VAE = {"channels": [8, 8, 8, 8], "norm_num_groups": 4}


def paper_settings(config_dir: Path = CONFIG_DIR, files: tuple[str, ...] = PAPER_CONFIGS) -> dict[str, Any]:
    """Top-level keys of the paper configuration (later files override earlier ones), as plain JSON values."""
    merged: dict[str, Any] = {}
    for name in files:
        path = Path(config_dir) / name
        try:
            merged.update(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            raise SystemExit(f"ERROR: {path}: cannot read the configuration ({err})") from err
    return merged


def _resolve_flash(kwargs: Mapping[str, Any], flash: bool) -> dict[str, Any]:
    """``unet_kwargs`` with ``@use_flash_attention``-style references replaced by ``flash``."""
    out = dict(kwargs)
    if isinstance(out.get("use_flash_attention"), str) or "use_flash_attention" not in out:
        out["use_flash_attention"] = flash
    return out


def build_paper_network(settings: Mapping[str, Any], device: torch.device, smoke: bool = False) -> nn.Module:
    """The paper's ``GCDMNetwork`` with random weights on ``device``: 4 + 4 input channels, CLIP frozen."""
    from custom.networks import LesionConditioner, MaskCLIPEncoder
    from custom.networks.gcdm import GCDMNetwork

    flash = device.type == "cuda"
    unet_kwargs = _resolve_flash(SMOKE_UNET if smoke else settings["unet_kwargs"], flash)
    unet_kwargs.setdefault("norm_eps", 1e-5)  # SD v1's GroupNorm eps
    clip_kwargs = dict(SMOKE_CLIP if smoke else settings["clip_kwargs"])
    token_dim = 16 if smoke else int(settings["cross_attention_dim"])
    with torch.device(device):
        encoder = MaskCLIPEncoder(clip_path=None, **clip_kwargs)
        encoder.requires_grad_(False).eval()  # frozen, as a loaded pretrained CLIP is
        encoder.freeze = True
        conditioner = LesionConditioner(
            mode=settings.get("conditioning_mode", "gated"),
            radiomic_dim=int(settings.get("radiomic_dim", 67)),
            num_tokens=int(settings.get("num_tokens", 1)),
            token_dim=token_dim,
            m=int(settings.get("fusion_m", 5)),
            n=int(settings.get("fusion_n", 5)),
            top_k=int(settings.get("fusion_top_k", 5)),
            null=settings.get("null_condition", "learned"),
            mask_encoder=encoder,
        )
        net = GCDMNetwork(
            latent_channels=SD_LATENT_CHANNELS,
            mask_latent_channels=SD_LATENT_CHANNELS,
            conditioner=conditioner,
            unet_kwargs=unet_kwargs,
            max_lesions=int(settings.get("max_lesions", 2)),
            channels_last=bool(settings.get("channels_last", False)) and flash,
        )
    return net


def diffusers_twin(unet: nn.Module, device: torch.device, norm_eps: float = 1e-5) -> nn.Module:
    """A diffusers ``UNet2DConditionModel`` with the configuration of a MONAI ``DiffusionModelUNet`` (SD v1 layout:
    cross-attention blocks where ``attention_levels``, one transformer layer, GEGLU, conv projections)."""
    from diffusers import UNet2DConditionModel

    channels = [int(c) for c in unet.block_out_channels]
    attn = [bool(a) for a in unet.attention_levels]
    head_ch = unet.num_head_channels
    head_ch = [int(head_ch)] * len(channels) if isinstance(head_ch, int) else [int(h) for h in head_ch]
    layers = unet.num_res_blocks
    layers = int(layers) if isinstance(layers, int) else int(layers[0])
    groups = int(unet.conv_in.conv.out_channels and unet.down_blocks[0].resnets[0].norm1.num_groups)
    cross_dim = int(unet.down_blocks[attn.index(True)].attentions[0].transformer_blocks[0].attn2.to_k.in_features)
    with torch.device(device):
        return UNet2DConditionModel(
            sample_size=32,
            in_channels=int(unet.in_channels),
            out_channels=int(unet.out_channels),
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            block_out_channels=tuple(channels),
            layers_per_block=layers,
            attention_head_dim=tuple(c // h for c, h in zip(channels, head_ch)),  # diffusers' name for the head count
            cross_attention_dim=cross_dim,
            norm_num_groups=groups,
            norm_eps=norm_eps,
        )


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (matrix products, convolutions, attention; forward and backward if ``fn`` runs it),
    by ``torch.utils.flop_counter.FlopCounterMode``. A multiply-add counts as 2 FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Mean wall seconds of ``fn`` over ``repeats`` calls after ``warmup`` calls (device synchronised)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / max(repeats, 1)


def gemm_peak(device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16, repeats: int = 10) -> float:
    """Measured matrix-product throughput in FLOP/s (``2 n^3`` per ``n x n x n`` product)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sec = timed(lambda: a @ b, device, repeats, warmup=3)
    return 2.0 * n**3 / sec


class _Batch:
    """Random cached-latent training batch of the paper shapes."""

    def __init__(self, b: int, latent: int, lesions: int, image_size: int, radiomic_dim: int, device: torch.device):
        g = torch.Generator().manual_seed(0)
        self.z0 = torch.randn(b, SD_LATENT_CHANNELS, latent, latent, generator=g).to(device)
        self.mask_latent = torch.randn(b, SD_LATENT_CHANNELS, latent, latent, generator=g).to(device)
        self.features = torch.rand(b, lesions, radiomic_dim, generator=g).to(device)
        self.lesion_masks = (torch.rand(b, lesions, image_size, image_size, generator=g) > 0.9).float().to(device)
        self.lesion_present = torch.ones(b, lesions, device=device)
        self.lesion_present[:, 1:] = 0


def make_train_step(net: nn.Module, batch: _Batch, settings: Mapping[str, Any], device: torch.device, bf16: bool):
    """One stage-2 step (noise, CFG drops, forward, MSE on the noise, backward, AdamW) as a closure."""
    from monai.networks.schedulers import DDPMScheduler

    from custom.networks.conditioning import cfg_dropout_masks

    lr = float(settings.get("lr", 1e-4))
    mult = float(settings.get("conditioner_lr_mult", 10.0))
    from custom.networks.sd_weights import gcdm_param_groups

    opt = torch.optim.AdamW(gcdm_param_groups(net, lr, mult, float(settings.get("weight_decay", 0.01))), lr=lr)
    sched = DDPMScheduler(
        num_train_timesteps=1000, schedule=settings.get("noise_schedule", "scaled_linear_beta"),
        beta_start=float(settings.get("beta_start", 0.00085)), beta_end=float(settings.get("beta_end", 0.012)),
    )
    b = batch.z0.shape[0]
    probs = {k: float(settings.get(k, 0.05)) for k in ("p_features", "p_mask", "p_both")}

    def step() -> float:
        noise = torch.randn_like(batch.z0)
        t = torch.randint(0, 1000, (b,), device=device)
        z_t = sched.add_noise(batch.z0, noise, t)
        drop_f, drop_m = cfg_dropout_masks(b, device=device, **probs)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            eps = net(z_t, t, batch.mask_latent, batch.features, batch.lesion_masks, batch.lesion_present,
                      drop_features=drop_f, drop_mask=drop_m)
            loss = torch.nn.functional.mse_loss(eps.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


class _Decoder:
    """``decode(z)`` of an SD-shaped random ``AutoencoderKL``: ``clamp(D(z / 0.18215), 0, 1)``, first channel."""

    def __init__(self, vae: nn.Module, scale: float = 0.18215):
        self.vae, self.scale = vae, scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z / self.scale)[:, :1].float().clamp(0, 1)


def _fmt(x: float, unit: str = "", digits: int = 3) -> str:
    return f"{x:.{digits}g}{unit}"


def run_checks(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """Steps 1-4 of the module docstring; returns table rows ``(what, figure, notes)``."""
    from monai.networks.schedulers import DDIMScheduler

    from custom.networks.sd_weights import build_sd_vae

    from custom.engines.sampling import ddim_sample

    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    bf16 = not smoke
    settings = paper_settings()
    rows: list[tuple[str, str, str]] = []
    torch.manual_seed(0)

    peak = gemm_peak(device, n=256 if smoke else 8192, dtype=torch.float32 if smoke else torch.bfloat16,
                     repeats=2 if smoke else 10)
    rows.append(("GEMM peak (measured)", _fmt(peak / 1e12, " TFLOP/s"),
                 "fp32 256³" if smoke else "bf16 8192³, mean of 10 after 3 warm-ups"))

    net = build_paper_network(settings, device, smoke=smoke).train()
    n_unet = sum(p.numel() for p in net.unet.parameters())
    n_cond = sum(p.numel() for p in net.conditioner.parameters())
    rows.append(("parameters", f"UNet {n_unet / 1e6:.1f} M, conditioner {n_cond / 1e6:.1f} M",
                 f"UNet in_channels {net.in_channels}, cross-attention {net.token_dim}-d, CLIP frozen, random weights"))
    latent = 8 if smoke else int(settings.get("image_size", 256)) // 8
    image_size = 64 if smoke else int(settings.get("image_size", 256))
    bsz = args.batch_size
    batch = _Batch(bsz, latent, net.max_lesions, image_size, int(settings.get("radiomic_dim", 67)), device)
    step = make_train_step(net, batch, settings, device, bf16)
    step()  # warm-up (allocations, cuDNN/cuBLAS heuristics)
    flops = count_flops(step)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sec = timed(step, device, args.train_steps, warmup=0)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    rows.append((f"stage-2 training step, batch {bsz}{', bf16' if bf16 else ', fp32'}",
                 f"{bsz / sec:.1f} images/s ({sec * 1e3:.0f} ms/step)",
                 f"cached latents {SD_LATENT_CHANNELS}×{latent}×{latent} + mask latent; {args.train_steps} steps"))
    rows.append(("training peak memory", "n/a (CPU)" if smoke else f"{mem:.1f} GiB", "torch.cuda.max_memory_allocated"))
    rows.append(("training MFU", f"{100 * flops / sec / peak:.1f} %",
                 f"{flops / 1e12:.2f} TFLOP/step counted (fwd+bwd) / step time / measured GEMM peak"))

    # sampling: 8 images, 50 DDIM steps, CFG
    with torch.device(device):
        vae = build_sd_vae(**(SMOKE_VAE if smoke else {})).eval()
    net.eval()
    n_img = args.sample_images
    sb = _Batch(n_img, latent, net.max_lesions, image_size, int(settings.get("radiomic_dim", 67)), device)
    scheduler = DDIMScheduler(num_train_timesteps=1000, schedule=settings.get("noise_schedule", "scaled_linear_beta"),
                              beta_start=float(settings.get("beta_start", 0.00085)),
                              beta_end=float(settings.get("beta_end", 0.012)), clip_sample=False)
    guidance = float(settings.get("guidance_scale", 3.0))

    def sample() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = ddim_sample(net, scheduler, sb.mask_latent, sb.features, sb.lesion_masks, sb.lesion_present,
                              num_inference_steps=args.ddim_steps, guidance_scale=guidance, eta=1.0,
                              decoder=_Decoder(vae), progress=False)
        assert out.images is not None and out.images.shape[0] == n_img

    s_sample = timed(sample, device, 1, warmup=1 if not smoke else 0)
    rows.append((f"sampling {n_img} images, {args.ddim_steps} DDIM steps, CFG {guidance:g}",
                 f"{s_sample / n_img:.3f} s/image ({s_sample:.2f} s)",
                 "eta 1.0; lesion context (CLIP + gated fusion) once per run, UNet at every step; SD-shaped VAE decode included"))

    rows += unet_vs_diffusers(net, batch, device, bf16, args)
    del net, vae, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def unet_vs_diffusers(net: nn.Module, batch: _Batch, device: torch.device, bf16: bool,
                      args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """UNet-only timings of MONAI's ``DiffusionModelUNet`` and diffusers' ``UNet2DConditionModel`` (step 4)."""
    try:
        twin = diffusers_twin(net.unet, device)
    except Exception as err:  # diffusers is optional on the GPU machine
        return [("UNet vs diffusers", "not run", f"diffusers unavailable: {type(err).__name__}: {err}"[:160])]
    monai_unet = net.unet
    rows = []
    # the twin's random weights loaded into the MONAI UNet through the SD key map: same outputs (fp32)?
    from custom.networks.sd_weights import load_unet_state_dict

    saved = {k: v.detach().clone() for k, v in monai_unet.state_dict().items()}
    load_unet_state_dict(monai_unet, twin.state_dict(), "diffusers", "diffusers twin")
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 comparison
    with torch.no_grad():
        xe = torch.randn(2, monai_unet.in_channels, batch.z0.shape[2], batch.z0.shape[3], device=device)
        te, ce = torch.tensor([10, 900], device=device), torch.randn(2, 1, net.token_dim, device=device)
        twin.eval(), monai_unet.eval()
        diff = (monai_unet(xe, te, context=ce) - twin(xe, te, encoder_hidden_states=ce).sample).abs().max().item()
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    monai_unet.load_state_dict(saved)
    rows.append(("MONAI UNet with the diffusers twin's weights (SD key map)", f"max |Δ| = {diff:.2e}",
                 "fp32 forward (TF32 off), 2 samples; the test suite checks <= 1e-4 on CPU"))
    n_m = sum(p.numel() for p in monai_unet.parameters())
    n_d = sum(p.numel() for p in twin.parameters())
    b = batch.z0.shape[0]
    x = torch.cat([batch.z0, batch.mask_latent], 1)
    t = torch.randint(0, 1000, (b,), device=device)
    ctx = torch.randn(b, 1, net.token_dim, device=device)
    reps = args.train_steps

    def train_step(model: nn.Module, call: Callable[[], torch.Tensor], opt: torch.optim.Optimizer) -> Callable[[], None]:
        def fn() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = call().float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return fn

    results = {}
    for name, model, call in (
        ("monai", monai_unet, lambda: monai_unet(x, t, context=ctx)),
        ("diffusers", twin, lambda: twin(x, t, encoder_hidden_states=ctx).sample),
    ):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        tr = timed(train_step(model, call, opt), device, reps, warmup=1)
        del opt
        model.eval()
        x2, t2, c2 = torch.cat([x[: args.sample_images]] * 2), torch.cat([t[: args.sample_images]] * 2), \
            torch.cat([ctx[: args.sample_images]] * 2)
        fwd = (lambda m=model, n=name: m(x2, t2, context=c2) if n == "monai" else m(x2, t2, encoder_hidden_states=c2))

        def infer(f=fwd) -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                f()
        fw = timed(infer, device, max(reps, 3), warmup=1)
        results[name] = (tr, fw)
    (tm, fm), (td, fd) = results["monai"], results["diffusers"]
    import diffusers

    note = f"same config, {n_m / 1e6:.1f} M vs {n_d / 1e6:.1f} M parameters; diffusers {diffusers.__version__}"
    return rows + [
        (f"UNet training step, batch {b}: MONAI / diffusers",
         f"{tm * 1e3:.0f} / {td * 1e3:.0f} ms = {tm / td:.2f}×", note),
        (f"UNet sampling forward (CFG batch {2 * args.sample_images}): MONAI / diffusers",
         f"{fm * 1e3:.1f} / {fd * 1e3:.1f} ms = {fm / fd:.2f}×", "per DDIM step, no grad"),
    ]


def run_ddp(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """Step 5: ``torch.distributed.run`` with one process per device, a few training steps, rank 0 reports."""
    import tempfile

    nproc = 1 if args.cpu_smoke else max(torch.cuda.device_count(), 1)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "ddp.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "custom.gpu_check", "--ddp-worker", str(report), "--batch-size", str(args.batch_size),
               "--train-steps", str(args.ddp_steps)] + (["--cpu-smoke"] if args.cpu_smoke else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.ddp_timeout)
        if proc.returncode != 0 or not report.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return [(f"DDP ({nproc} process)", "FAILED", " / ".join(tail)[:300])]
        r = json.loads(report.read_text())
    return [(f"DDP training, {r['world_size']} process(es) × batch {r['batch_size']}",
             f"{r['images_per_s']:.1f} images/s", f"torch.distributed.run, backend {r['backend']}, "
             f"{r['steps']} steps, DistributedDataParallel(find_unused_parameters=True), "
             f"grads all-reduced (rank-0 loss {r['loss']:.3f})")]


def ddp_worker(args: argparse.Namespace) -> None:
    """One rank of step 5 (started by :func:`run_ddp` through ``torch.distributed.run``)."""
    import torch.distributed as dist

    smoke = args.cpu_smoke
    backend = "gloo" if smoke else "nccl"
    dist.init_process_group(backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu") if smoke else torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(rank)
    settings = paper_settings()
    net = build_paper_network(settings, device, smoke=smoke).train()
    ddp = nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None,
                                              find_unused_parameters=True)
    latent = 8 if smoke else int(settings.get("image_size", 256)) // 8
    image_size = 64 if smoke else int(settings.get("image_size", 256))
    batch = _Batch(args.batch_size, latent, net.max_lesions, image_size, int(settings.get("radiomic_dim", 67)), device)
    step = make_train_step(ddp, batch, settings, device, bf16=not smoke)
    step()
    dist.barrier()
    t0 = time.perf_counter()
    loss = 0.0
    for _ in range(args.train_steps):
        loss = step()
    _sync(device)
    dist.barrier()
    sec = (time.perf_counter() - t0) / max(args.train_steps, 1)
    if rank == 0:
        Path(args.ddp_worker).write_text(json.dumps({
            "world_size": world, "batch_size": args.batch_size, "steps": args.train_steps, "backend": backend,
            "images_per_s": world * args.batch_size / sec, "loss": loss}))
    dist.destroy_process_group()


def device_name(smoke: bool) -> str:
    if smoke:
        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores) — smoke shapes, figures meaningless"
    props = torch.cuda.get_device_properties(0)
    return (f"{torch.cuda.device_count()} × {props.name} ({props.total_memory / 2**30:.0f} GiB, "
            f"{props.multi_processor_count} SMs)")


def table(rows: list[tuple[str, str, str]], device: str, seconds: float) -> str:
    import monai

    lines = [
        "## GPU check (`make gpu-check`)",
        "",
        f"Measured by `python3 -m custom.gpu_check` on {time.strftime('%Y-%m-%d')}: {device}; torch "
        f"{torch.__version__}, CUDA {torch.version.cuda}, MONAI {monai.__version__}; {seconds:.0f} s in all. "
        "Paper configuration (`paper.json`) with random SD-v1-shaped weights (nothing downloaded); GCDM's per-GPU "
        f"batch is {GCDM_BATCH_PER_GPU} (2 GPUs × 32).",
        "",
        "| what | figure | notes |",
        "| --- | --- | --- |",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Replace (or append) the text between :data:`BEGIN` and :data:`END` in ``path``, atomically."""
    old = path.read_text() if path.is_file() else "# Benchmarks\n"
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + block + rest.split(END, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


#: Pure-python packages ``--make-site`` copies (import name, distribution name).
SITE_PACKAGES = (("monai", "monai"), ("ignite", "pytorch_ignite"), ("diffusers", "diffusers"))


def make_site(dest: Path) -> list[str]:
    """Copy the installed pure-python packages of :data:`SITE_PACKAGES` (and their ``.dist-info``) into ``dest``
    (emptied first), leaving out byte code; returns what was copied. For a GPU machine with torch but no venv."""
    import importlib.util
    import shutil

    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.pyd")
    copied = []
    for module, dist in SITE_PACKAGES:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"ERROR: --make-site: package {module!r} is not installed in {sys.executable}")
        src = Path(list(spec.submodule_search_locations)[0])
        shutil.copytree(src, dest / module, ignore=ignore)
        copied.append(module)
        for info in src.parent.glob(f"{dist}-*.dist-info"):
            shutil.copytree(info, dest / info.name)
    return copied


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=None, help=f"training batch per device (GCDM: {GCDM_BATCH_PER_GPU})")
    ap.add_argument("--train-steps", type=int, default=None, help="timed training steps (default 10; smoke 1)")
    ap.add_argument("--sample-images", type=int, default=None, help="images sampled (default 8; smoke 2)")
    ap.add_argument("--ddim-steps", type=int, default=None, help="DDIM steps (default 50; smoke 2)")
    ap.add_argument("--ddp-steps", type=int, default=None, help="timed DDP steps (default 5; smoke 1)")
    ap.add_argument("--ddp-timeout", type=float, default=240.0, help="seconds the DDP run may take")
    ap.add_argument("--output", default=str(REPO / "bundle" / "docs" / "benchmarks.md"),
                    help="markdown file the table is written into ('' = print only)")
    ap.add_argument("--json", default="", help="also write the rows as JSON here")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (wiring check, no figures)")
    ap.add_argument("--make-site", default=None, metavar="DIR",
                    help="only copy monai, ignite and diffusers (pure python) into DIR for a GPU machine, then exit")
    ap.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.make_site:
        size = 0
        for module in make_site(Path(args.make_site)):
            size += sum(f.stat().st_size for f in (Path(args.make_site) / module).rglob("*") if f.is_file())
        print(f"{args.make_site}: {', '.join(m for m, _ in SITE_PACKAGES)} copied ({size / 2**20:.1f} MiB)")
        return 0
    smoke = args.cpu_smoke
    defaults = {"batch_size": 2 if smoke else GCDM_BATCH_PER_GPU, "train_steps": 1 if smoke else 10,
                "sample_images": 2 if smoke else 8, "ddim_steps": 2 if smoke else 50, "ddp_steps": 1 if smoke else 5}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
        elif getattr(args, k) < 1:
            print(f"ERROR: --{k.replace('_', '-')}: must be >= 1, got {getattr(args, k)}", file=sys.stderr)
            return 2
    if args.ddp_worker:
        ddp_worker(args)
        return 0
    if not smoke and not torch.cuda.is_available():
        print("ERROR: gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine, or "
              "pass --cpu-smoke for the tiny CPU wiring check", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows = run_checks(args)
    rows += run_ddp(args)
    text = table(rows, device_name(smoke), time.perf_counter() - t0)
    print(text)
    if args.output:
        write_section(Path(args.output), text)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name(smoke), "rows": rows}, indent=1))
    return 0 if all(r[1] != "FAILED" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
