"""Benchmarks (``make bench``): one run, interleaved repetitions, medians; written to ``bundle/docs/benchmarks.md``.

What it measures, on this machine (named in the output with its load average before and after the run):

1. **Machine peak**: fp32 GEMM (``torch.mm`` of 2048 x 2048, or ``--gemm_n``) with 1 thread and all threads.
2. **Denoiser vs the peer**: the project's UNet (MONAI ``DiffusionModelUNet`` with the bundle's ``unet_kwargs``,
   SDPA attention) against diffusers' ``UNet2DConditionModel`` of the identical configuration (same channels,
   attention levels, heads, res blocks, cross-attention width; the parameter counts are printed side by side),
   default and paper shapes at a 32 x 32 latent: a training step (forward + backward + SGD) and a sampling step
   (one CFG forward of batch 2). Achieved FLOP/s (``torch.utils.flop_counter``) as a fraction of the GEMM peak.
   The project's einsum attention (``use_flash_attention=False``) is timed in the same rounds.
3. **Sampling**: seconds per image of the whole GCDM sampler (``ddim_sample``) at the configured DDIM steps for a
   request of several rows — all rows in one call vs one call per row, lesion context once vs per step; and for
   the paper config the cost of recomputing the lesion context at every step (conditioner time / UNet step).
   ``--compile`` adds ``torch.compile`` vs eager for the default UNet forward (compile time reported apart).
4. **Radiomics**: lesions/s with 1 process vs all cores (cache off).
5. **Real-size preprocessing** (4084 x 3328 phantom mammograms, uncompressed and JPEG 2000): images/s per core
   (1 process, 1 torch thread) of the project's per-image pipeline now (integer stored values through a float32
   LUT table, reduced-resolution breast mask, crop before flip/convert/resize), of the same pipeline with the
   full-resolution mask and per-pixel float64 LUTs (before issue 10), of JPEG 2000 decoded at reduced resolution
   (``j2k_reduce="auto"``, with its agreement to full decoding: PSNR of the prepared 16-bit image, breast IoU), and
   of a minimal pydicom + numpy baseline (read, pydicom's LUTs, threshold, crop, resize, write) as the ratio's
   denominator; then all cores through a process pool.

Every group interleaves its contenders round by round (A, B, C, A, B, C, ...) after one warm-up each and reports
medians, so a load change on a shared machine hits all contenders alike; ratios are the headline, absolute times
the footnote. Nothing here is a pass/fail threshold. ``--tiny`` runs everything at toy sizes (the test suite's
smoke run).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "bundle" / "configs" / "radiomics_params.yaml"
CONFIGS = REPO / "bundle" / "configs"

Row = tuple[str, str, str]


# ----------------------------------------------------------------------------------------------------- helpers
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def interleaved(tasks: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each task, the tasks run in turn (round robin) ``repeats`` times after
    ``warmup`` calls each."""
    for fn in tasks.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in tasks}
    for _ in range(max(1, repeats)):
        for name, fn in tasks.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call of ``fn`` (``torch.utils.flop_counter``: matmuls, convolutions,
    attention; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def gemm_peak(n: int, threads: int, repeats: int) -> float:
    """fp32 GEMM FLOP/s of ``torch.mm`` (n x n) @ (n x n) with ``threads`` intra-op threads."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        dt = interleaved({"mm": lambda: torch.mm(a, b)}, repeats)["mm"]
    finally:
        torch.set_num_threads(old)
    return 2.0 * n**3 / dt


def _parse(files: list[str], **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    for key, value in overrides.items():
        parser[key] = value
    return parser


# ------------------------------------------------------------------------------------------ denoiser vs peers
def unet_shapes(name: str, tiny: bool = False) -> dict[str, Any]:
    """The UNet configuration of the ``default`` or ``paper`` bundle config: MONAI kwargs, the diffusers
    equivalent and the context length."""
    files = ["common.json", "train_diffusion.json"] + (["paper.json"] if name == "paper" else [])
    # shapes only: paper.json refuses to resolve without Stable Diffusion weights unless told they are random
    p = _parse(files, **({"sd_random_weights": True} if name == "paper" else {}))
    unet = dict(p.get_parsed_content("unet_kwargs"))
    in_c = int(p.get_parsed_content("latent_channels")) + int(p.get_parsed_content("mask_latent_channels"))
    out_c = int(p.get_parsed_content("latent_channels"))
    cross = int(p.get_parsed_content("cross_attention_dim"))
    tokens = int(p.get_parsed_content("max_lesions")) * int(p.get_parsed_content("num_tokens"))
    if tiny:
        unet.update(channels=[8, 16, 16], attention_levels=[False, True, True], num_head_channels=8, norm_num_groups=8)
        cross = 16
    return {"monai": unet, "in_channels": in_c, "out_channels": out_c, "cross": cross, "tokens": tokens,
            "diffusers": diffusers_kwargs(unet, in_c, out_c, cross)}


def diffusers_kwargs(unet: dict[str, Any], in_c: int, out_c: int, cross: int) -> dict[str, Any]:
    """``UNet2DConditionModel`` arguments of the same network as MONAI ``DiffusionModelUNet(**unet)``."""
    ch = list(unet["channels"])
    att = list(unet["attention_levels"])
    head_ch = unet.get("num_head_channels", 8)
    head_ch = list(head_ch) if isinstance(head_ch, (list, tuple)) else [head_ch] * len(ch)
    heads = [c // h for c, h in zip(ch, head_ch)]
    return dict(
        sample_size=32, in_channels=in_c, out_channels=out_c, block_out_channels=tuple(ch),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in att),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(att)),
        layers_per_block=int(unet.get("num_res_blocks", 2)), norm_num_groups=int(unet.get("norm_num_groups", 32)),
        cross_attention_dim=cross, attention_head_dim=tuple(heads),  # diffusers: "attention_head_dim" = heads
        transformer_layers_per_block=int(unet.get("transformer_num_layers", 1)),
    )


def bench_peers(name: str, repeats: int, peak: float, tiny: bool = False, latent: int = 32) -> list[Row]:
    import torch
    from monai.networks.nets import DiffusionModelUNet

    cfg = unet_shapes(name, tiny)
    torch.manual_seed(0)
    common = dict(spatial_dims=2, in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
                  with_conditioning=True, cross_attention_dim=cfg["cross"])
    ours = DiffusionModelUNet(**common, **{**cfg["monai"], "use_flash_attention": True})
    einsum = DiffusionModelUNet(**common, **{**cfg["monai"], "use_flash_attention": False})
    einsum.load_state_dict(ours.state_dict())
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:  # optional dependency (the test extra)
        peer = None
    else:
        peer = UNet2DConditionModel(**cfg["diffusers"])
    n_ours = sum(q.numel() for q in ours.parameters())
    n_peer = sum(q.numel() for q in peer.parameters()) if peer is not None else 0
    b_train = 1 if name == "paper" else 4
    lat = 8 if tiny else latent

    def inputs(b):
        g = torch.Generator().manual_seed(1)
        return (torch.randn(b, cfg["in_channels"], lat, lat, generator=g), torch.randint(0, 1000, (b,), generator=g),
                torch.randn(b, cfg["tokens"], cfg["cross"], generator=g))

    xt, tt, ct = inputs(b_train)
    xs, ts, cs = inputs(2)
    nets = {"project (SDPA)": ours, "project (einsum)": einsum}
    if peer is not None:
        nets["diffusers"] = peer

    def call(net, x, t, c):
        out = net(x, t, c) if net is peer else net(x, t, context=c)
        return out.sample if net is peer else out

    def train_step(net):
        opt = torch.optim.SGD(net.parameters(), 1e-6)

        def step():
            loss = call(net, xt, tt, ct).float().pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def sample_step(net):
        @torch.no_grad()
        def step():
            call(net, xs, ts, cs)
        return step

    rows: list[Row] = []
    label = f"{name} UNet, {lat}x{lat} latent"
    rows.append((f"parameters, {label}", f"project {n_ours / 1e6:.2f} M / diffusers {n_peer / 1e6:.2f} M",
                 "identical configuration" if peer is not None and n_ours == n_peer else
                 ("diffusers not installed" if peer is None else "counts differ: see notes")))
    for kind, make, b in (("training step", train_step, b_train), ("sampling step (CFG forward)", sample_step, 2)):
        for net in nets.values():
            net.train(kind == "training step")
        fns = {k: make(v) for k, v in nets.items()}
        flops = count_flops(fns["project (SDPA)"])
        med = interleaved(fns, repeats)
        base = med["project (SDPA)"]
        parts = [f"{k} {med[k] / base:.2f}x" for k in med if k != "project (SDPA)"]
        rows.append((f"{kind}, {label}, batch {b}", "time / project SDPA: " + ", ".join(parts),
                     "; ".join(f"{k} {med[k] * 1e3:.0f} ms" for k in med)))
        rows.append((f"{kind}, {label}: achieved FLOP/s", f"{flops / base / peak:.1%} of GEMM peak",
                     f"{flops / 1e9:.1f} GFLOP per call / {base * 1e3:.0f} ms = {flops / base / 1e9:.1f} GFLOP/s; "
                     f"diffusers {flops / med.get('diffusers', float('nan')) / peak:.1%}"))
    return rows


# ---------------------------------------------------------------------------------------------------- sampling
def _gcdm_network(name: str, tiny: bool, use_flash_attention: bool = True):
    import torch

    files = ["common.json", "train_diffusion.json"] + (["paper.json"] if name == "paper" else [])
    # the network's shapes only: random weights, no Stable Diffusion file (paper.json's network_def loads one)
    overrides = {"use_flash_attention": use_flash_attention, "network_def": "@diffusion_def"}
    if name == "paper":
        overrides["sd_random_weights"] = True
    if tiny:
        overrides.update({"cross_attention_dim": 16, "image_size": 32,
                          "unet_kwargs": {"channels": [8, 16, 16], "attention_levels": [False, True, True],
                                          "num_res_blocks": 1, "num_head_channels": 8, "norm_num_groups": 8,
                                          "use_flash_attention": use_flash_attention},
                          "clip_kwargs": {"image_size": 16, "patch_size": 8, "hidden_size": 16, "num_hidden_layers": 1,
                                          "num_attention_heads": 2, "intermediate_size": 32, "output": "pooled"}})
    p = _parse(files, **overrides)
    torch.manual_seed(0)
    net = p.get_parsed_content("network_def").eval()
    return net, p


def _conditions(net, b: int, lat: int, size: int):
    import torch

    g = torch.Generator().manual_seed(2)
    return {
        "mask_latent": torch.randn(b, net.mask_latent_channels, lat, lat, generator=g),
        "features": torch.rand(b, net.max_lesions, 67, generator=g),
        "lesion_masks": (torch.rand(b, net.max_lesions, size, size, generator=g) > 0.9).float(),
        "lesion_present": torch.ones(b, net.max_lesions),
    }


def bench_sampling(repeats: int, rows_per_request: int, tiny: bool = False, paper: bool = True) -> list[Row]:
    import torch

    from custom.engines.sampling import ddim_sample

    net, p = _gcdm_network("default", tiny)
    steps = 2 if tiny else int(p.get_parsed_content("ddim_steps"))
    sched = p.get_parsed_content("sampling_scheduler")
    size = int(p.get_parsed_content("image_size"))
    lat = 8 if tiny else size // 4
    c = _conditions(net, rows_per_request, lat, size)
    seeds = list(range(rows_per_request))

    def batched(context_once=True):
        return lambda: ddim_sample(net, sched, **c, num_inference_steps=steps, seed=seeds, progress=False,
                                   context_once=context_once)

    def row_by_row():
        for i in seeds:
            ddim_sample(net, sched, **{k: v[i : i + 1] for k, v in c.items()}, num_inference_steps=steps, seed=i,
                        progress=False)

    med = interleaved({"batched": batched(), "row by row": row_by_row, "context per step": batched(False)}, repeats)
    n = rows_per_request
    out = [
        (f"sampling, default config, {n} rows of one request", f"{med['batched'] / n:.2f} s/image",
         f"{steps} DDIM steps, CFG 3 (batch 2x{n}), {lat}x{lat} latent, decode excluded; all rows in one call"),
        ("sampling: batching the rows of a request", f"{med['row by row'] / med['batched']:.2f}x faster",
         f"one call per row {med['row by row'] / n:.2f} s/image vs all rows in one call"),
        ("sampling: lesion context once per run", f"{med['context per step'] / med['batched']:.2f}x faster",
         f"context recomputed each step {med['context per step'] / n:.2f} s/image (default config)"),
    ]
    if not paper:
        return out
    # paper config: what recomputing the lesion context each step would cost (one step, not a whole run)
    pnet, _ = _gcdm_network("paper", tiny)
    plat = 8 if tiny else 32
    psize = 32 if tiny else 256
    pc = _conditions(pnet, 1, plat, psize)
    two = {k: torch.cat([v, v]) for k, v in pc.items()}
    flags = torch.tensor([False, True])
    with torch.no_grad():
        ctx = pnet.context(two["features"], two["lesion_masks"], two["lesion_present"], flags, flags)
    x, t = torch.randn(2, pnet.latent_channels, plat, plat), torch.tensor([500, 500])

    @torch.no_grad()
    def context():
        pnet.context(two["features"], two["lesion_masks"], two["lesion_present"], flags, flags)

    @torch.no_grad()
    def unet_step():
        pnet(x, t, **two, drop_features=flags, drop_mask=flags, context=ctx)

    pm = interleaved({"context": context, "step": unet_step}, max(1, repeats // 2))
    fc, fs = count_flops(context), count_flops(unet_step)
    out.append(("sampling: lesion context once, paper config", f"{(pm['context'] + pm['step']) / pm['step']:.2f}x faster steps",
                f"per CFG step at {plat}x{plat}: conditioner {pm['context']:.2f} s ({fc / 1e9:.0f} GFLOP) + UNet "
                f"{pm['step']:.2f} s ({fs / 1e9:.0f} GFLOP) if recomputed, UNet alone once computed"))
    return out


def bench_compile(repeats: int, tiny: bool = False) -> list[Row]:
    import torch

    net, p = _gcdm_network("default", tiny)
    size = int(p.get_parsed_content("image_size"))
    lat = 8 if tiny else size // 4
    c = {k: torch.cat([v, v]) for k, v in _conditions(net, 1, lat, size).items()}
    flags = torch.tensor([False, True])
    with torch.no_grad():
        ctx = net.context(c["features"], c["lesion_masks"], c["lesion_present"], flags, flags)
    x, t = torch.randn(2, net.latent_channels, lat, lat), torch.tensor([500, 500])
    compiled = torch.compile(net.forward, dynamic=False)
    with torch.no_grad():
        t0 = time.perf_counter()
        compiled(x, t, **c, drop_features=flags, drop_mask=flags, context=ctx)
        compile_s = time.perf_counter() - t0

        def run(fn):
            return lambda: fn(x, t, **c, drop_features=flags, drop_mask=flags, context=ctx)

        med = interleaved({"eager": run(net.forward), "compiled": run(compiled)}, repeats * 3)
    return [("sampling step, torch.compile (optional)", f"{med['eager'] / med['compiled']:.2f}x faster",
             f"default config CFG step: eager {med['eager'] * 1e3:.1f} ms, compiled {med['compiled'] * 1e3:.1f} ms; "
             f"first call (compilation) {compile_s:.0f} s")]


# --------------------------------------------------------------------------------------------------- radiomics
def bench_radiomics(work: Path, n_studies: int, cores: int, tiny: bool = False) -> list[Row]:
    from custom.data.phantom import generate_phantom_dataset
    from custom.data.prepare import PrepareWorkflow
    from custom.features.radiomics import LesionJob, extract_features

    phantom = work / "phantom"
    generate_phantom_dataset(phantom, n_studies=n_studies, seed=123, image_shape=(320, 256) if tiny else (640, 512),
                             progress=False)
    out = work / "prepared"
    wf = PrepareWorkflow(str(phantom), str(out), str(PARAMS), num_workers=cores, progress=False, preview_cases=0,
                         image_size=64 if tiny else 256)
    cases, _, _ = wf.load_cases()
    records, _, _ = wf.preprocess(cases)
    jobs = [LesionJob(r["case_id"], str(out / r["image"]), str(out / r["lesions"])) for r in records if r["num_lesions"]]
    rates = {}
    for workers in sorted({1, cores}):
        t = time.perf_counter()
        res = extract_features(jobs, PARAMS, cache_dir=None, num_workers=workers, progress=False, mp_context="spawn")
        rates[workers] = len(res.rows) / (time.perf_counter() - t)
    rows = [(f"radiomics, {w} process(es)", f"{r:.1f} lesions/s", f"{len(jobs)} lesions at {wf.settings.image_size}x{wf.settings.image_size}, 67 features, "
             "cache off, incl. process start-up") for w, r in rates.items()]
    if cores > 1:
        rows.append(("radiomics: all cores vs 1", f"{rates[cores] / rates[1]:.2f}x", f"{cores} processes"))
    return rows


# ------------------------------------------------------------------------------------ real-size preprocessing
def write_real_size_images(folder: Path, shape: tuple[int, int], n: int) -> dict[str, list[Path]]:
    """``n`` phantom mammograms of ``shape`` written uncompressed and as JPEG 2000 (lossless)."""
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

    from custom.data.phantom import _write_dicom, phantom_image

    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Path]] = {"uncompressed": [], "JPEG 2000": []}
    for i in range(n):
        ph = phantom_image(11, i // 4, i % 4, shape)
        for kind, ts in (("uncompressed", ExplicitVRLittleEndian), ("JPEG 2000", JPEG2000Lossless)):
            path = folder / f"{kind.split()[0]}_{i}.dcm"
            used = _write_dicom(ph.dataset.copy(), ph.stored, ts, path)
            if kind == "JPEG 2000" and used != JPEG2000Lossless:
                continue  # no encoder: leave JPEG 2000 out rather than mislabel
            out[kind].append(path)
    return out


def baseline_preprocess(path: Path, out: Path, size: int) -> None:
    """A minimal pydicom + numpy preprocessing, the comparison point: read, pydicom's modality + VOI LUT on every
    pixel (float64), normalise, MONOCHROME1 inversion, a global threshold at the mean for the breast, crop to its
    bounding box, resize the longer side to ``size`` (PIL, area), pad, write a 16-bit PNG."""
    import numpy as np
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    arr = (arr - arr.min()) / max(arr.max() - arr.min(), 1e-12)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        arr = 1.0 - arr
    fg = arr > arr.mean()
    rows, cols = np.flatnonzero(fg.any(1)), np.flatnonzero(fg.any(0))
    crop = arr[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32)
    scale = size / max(crop.shape)
    new = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    small = np.asarray(Image.fromarray(crop, mode="F").resize(new, Image.Resampling.BOX))
    canvas = np.zeros((size, size), np.float32)
    canvas[: small.shape[0], : small.shape[1]] = small
    Image.fromarray(np.round(canvas.clip(0, 1) * 65535).astype(np.uint16)).save(out / f"{path.stem}.png")


def bench_real_size(work: Path, n_images: int, repeats: int, cores: int, tiny: bool = False,
                    files: dict[str, list[Path]] | None = None) -> list[Row]:
    from unittest import mock

    from custom.data.cases import MammoCase
    from custom.data.prepare import PreprocessSettings, preprocess_case
    from custom.transforms import intensity, masks

    import dataclasses

    import torch

    shape = (204, 166) if tiny else (4084, 3328)
    files = files or write_real_size_images(work / "real_size", shape, n_images)
    settings = PreprocessSettings(image_size=64 if tiny else 256)
    # auto: the shorter side kept >= 2 x the output size (2 levels at real size); the toy size forces 1 level
    reduced = dataclasses.replace(settings, j2k_reduce="1" if tiny else "auto")
    out_dir = work / "real_size_out"
    (out_dir / "base").mkdir(parents=True, exist_ok=True)
    full_mask = masks.breast_mask
    per_pixel = intensity.apply_dicom_grayscale

    def now(paths, s=settings, folder=out_dir):
        def run():
            for p in paths:
                preprocess_case(MammoCase(case_id=p.stem, image_path=str(p), study_id=p.stem), str(folder), s)
        return run

    def before(paths):
        def run():
            with mock.patch("custom.data.prepare.breast_mask", lambda img, border=0.01: full_mask(img, border, reduce=1)), \
                 mock.patch.object(intensity, "apply_dicom_grayscale",
                                   lambda *a, **k: per_pixel(*a, **{**k, "use_table": False})):
                now(paths)()
        return run

    def baseline(paths):
        return lambda: [baseline_preprocess(p, out_dir / "base", settings.image_size) for p in paths]

    rows: list[Row] = []
    med_now: dict[str, float] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core: one process, one thread
    try:
        for kind, paths in files.items():
            if not paths:
                rows.append((f"preprocessing {shape[0]}x{shape[1]}, {kind}", "not measured", "no encoder installed"))
                continue
            tasks = {"now": now(paths), "before": before(paths), "baseline": baseline(paths)}
            if kind == "JPEG 2000":
                tasks["reduced"] = now(paths, reduced, out_dir / "reduced")
            med = interleaved(tasks, repeats)
            k = len(paths)
            med_now[kind] = med["now"] / k
            rows.append((f"preprocessing {shape[0]}x{shape[1]} {kind}, per core",
                         f"{k / med['now']:.2f} images/s; {med['baseline'] / med['now']:.2f}x the pydicom+numpy baseline",
                         f"now {med['now'] / k:.2f} s/image; before issue 10 (full-resolution mask, float64 LUTs) "
                         f"{med['before'] / k:.2f} s/image ({med['before'] / med['now']:.2f}x slower); baseline "
                         f"{med['baseline'] / k:.2f} s/image; 1 process, 1 thread"))
            if "reduced" in med:
                psnr, iou = _agreement(out_dir, out_dir / "reduced", paths)
                rows.append((f"preprocessing {shape[0]}x{shape[1]} {kind}, reduced decoding (j2k_reduce auto), per core",
                             f"{k / med['reduced']:.2f} images/s; {med['baseline'] / med['reduced']:.2f}x the "
                             f"pydicom+numpy baseline",
                             f"{med['reduced'] / k:.2f} s/image, {med['now'] / med['reduced']:.1f}x full decoding; vs "
                             f"full decoding + the same preprocessing: PSNR {psnr:.1f} dB (16-bit output), breast "
                             f"IoU {iou:.4f}"))
    finally:
        torch.set_num_threads(threads)
    if cores > 1 and files["uncompressed"]:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        paths = files["uncompressed"] + files["JPEG 2000"]
        jobs = [(str(p), str(out_dir / f"pool{r}"), settings) for r in range(cores) for p in paths]
        one = sum(med_now.values()) / len(med_now)  # s/image of one process, the kinds mixed equally
        # spawn, not fork: a forked child of a process that already ran torch's thread pools can deadlock; the
        # workers start and import everything first (one warm-up image each), then the timed round
        with ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_prep_one, jobs[:cores]))
            t = time.perf_counter()
            list(pool.map(_prep_one, jobs, chunksize=1))
            dt = time.perf_counter() - t
        rows.append((f"preprocessing {shape[0]}x{shape[1]}, {cores} processes vs 1",
                     f"{len(jobs) / dt:.2f} images/s; {len(jobs) / dt * one:.2f}x one process",
                     f"{len(jobs)} images (half uncompressed, half JPEG 2000, full decoding), warm workers "
                     f"(process start-up excluded); one process {1 / one:.2f} images/s in the rounds above"))
    return rows


def _agreement(full_dir: Path, reduced_dir: Path, paths: list[Path]) -> tuple[float, float]:
    """Worst PSNR (dB, 16-bit range) of the prepared images and worst breast IoU of the label maps, reduced vs
    full decoding, over ``paths``."""
    import numpy as np
    from PIL import Image

    psnrs, ious = [], []
    for p in paths:
        a, b = (np.asarray(Image.open(d / "images" / f"{p.stem}.png"), dtype=np.float64) for d in (full_dir, reduced_dir))
        mse = float(((a - b) ** 2).mean())
        psnrs.append(10 * np.log10(65535.0**2 / max(mse, 1e-12)))
        la, lb = (np.asarray(Image.open(d / "labels" / f"{p.stem}.png")) >= 1 for d in (full_dir, reduced_dir))
        ious.append(float((la & lb).sum() / max(1, (la | lb).sum())))
    return min(psnrs), min(ious)


def _prep_one(args) -> None:
    from custom.data.cases import MammoCase
    from custom.data.prepare import preprocess_case

    import torch

    torch.set_num_threads(1)  # one core per worker process
    path, out, settings = args
    stem = Path(path).stem
    preprocess_case(MammoCase(case_id=stem, image_path=path, study_id=stem), out, settings)


# -------------------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> str:
    import torch

    cores = 1 if args.tiny else (os.cpu_count() or 1)  # the smoke run starts no process pools
    load_before = load_average()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    n = 256 if args.tiny else args.gemm_n
    peak1 = gemm_peak(n, 1, args.repeats)
    peak = gemm_peak(n, torch.get_num_threads(), args.repeats)
    rows: list[Row] = [
        ("fp32 GEMM peak, 1 thread", f"{peak1 / 1e9:.1f} GFLOP/s", f"torch.mm {n}x{n}, median of {args.repeats}"),
        (f"fp32 GEMM peak, {torch.get_num_threads()} threads", f"{peak / 1e9:.1f} GFLOP/s", "the reference for the FLOP/s fractions below"),
    ]
    sections = set(args.only or ["peers", "sampling", "radiomics", "preprocessing"])
    if "peers" in sections:
        rows += bench_peers("default", args.repeats, peak, args.tiny)
        if not args.skip_paper:
            rows += bench_peers("paper", max(1, args.repeats // 2), peak, args.tiny)
    if "sampling" in sections:
        rows += bench_sampling(args.repeats, args.rows, args.tiny, paper=not args.skip_paper)
        if args.compile:
            rows += bench_compile(args.repeats, args.tiny)
    work = Path(tempfile.mkdtemp(prefix="mammo_bench_"))
    try:
        if "radiomics" in sections:
            rows += bench_radiomics(work, 1 if args.tiny else args.n_studies, cores, args.tiny)
        if "preprocessing" in sections:
            rows += bench_real_size(work, 1 if args.tiny else args.n_images, args.repeats, cores, args.tiny)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    device = "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU run)"
    lines = [
        "# Benchmarks",
        "",
        f"Measured by `make bench` ({'--tiny smoke run, ' if args.tiny else ''}started {started}) on **{cpu_name()}**, "
        f"{cores} cores, GPU {device}, torch {torch.__version__} with {torch.get_num_threads()} threads. "
        f"Load average (1/5/15 min) before: {load_before}; after: {load_average()}.",
        "",
        *([args.note, ""] if args.note else []),
        "Each group runs its contenders in turn, round after round, and reports medians; ratios are the headline "
        "(they survive a shared machine's load better than absolute times, which are the footnote in the notes "
        "column). Model steps run on random inputs of the configs' shapes. Nothing here is a pass/fail limit.",
        "",
        "| what | result | notes |",
        "| --- | --- | --- |",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
    ]
    return "\n".join(lines)


def kept_sections(previous: str) -> list[str]:
    """The ``<!-- NAME:begin --> ... <!-- NAME:end -->`` blocks of a previous benchmarks file, in order: sections
    written by other commands, which a ``make bench`` rerun keeps."""
    import re

    return [m.group(0) for m in re.finditer(r"<!-- ([\w.-]+):begin -->.*?<!-- \1:end -->", previous, flags=re.S)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default=str(REPO / "bundle" / "docs" / "benchmarks.md"))
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds per group (after a warm-up)")
    ap.add_argument("--n_studies", type=int, default=5, help="phantom studies (4 images) for the radiomics figures")
    ap.add_argument("--n_images", type=int, default=1, help="real-size images per compression for preprocessing")
    ap.add_argument("--rows", type=int, default=4, help="rows (samples) of the sampling request")
    ap.add_argument("--gemm_n", type=int, default=2048)
    ap.add_argument("--skip_paper", action="store_true", help="leave out the paper-sized UNet comparison")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile)")
    ap.add_argument("--only", nargs="*", choices=["peers", "sampling", "radiomics", "preprocessing"])
    ap.add_argument("--tiny", action="store_true", help="toy sizes: a smoke run of every section")
    ap.add_argument("--note", default="", help="a paragraph written under the header (e.g. what else ran on the machine)")
    args = ap.parse_args(argv)
    text = run(args)
    from custom.io import atomic_write_text

    try:  # keep the marked sections other commands wrote (`make gpu-check`, the MONAI Label latency bench, ...)
        text += "".join(f"\n{block}\n" for block in kept_sections(Path(args.output).read_text()))
    except OSError:
        pass
    atomic_write_text(args.output, text)
    print(text)


if __name__ == "__main__":
    main()
