"""Benchmarks (``make bench``): throughput figures written to ``bundle/docs/benchmarks.md``.

Measures, on this machine, with the phantom dataset:

- preprocessing throughput (images/s): DICOM read + grayscale + breast mask + geometry + writing, 1 process vs all
  cores;
- radiomics throughput (lesions/s): 67 features per lesion, 1 process vs all cores, cache off;
- training-step throughput (images/s) of stage 1 and stage 2 for the default and paper configs, on random inputs
  of the configs' shapes (data loading excluded; a plain SGD step, so optimiser state is left out and the
  paper-scale step fits in 24 GB — Adam adds two parameter-sized buffers and a little time), and the latent cache's effect as a ratio (a stage-2 step that
  must also encode the image and the 3 soft-mask channels vs one that reads cached latents);
- sampling latency (s/image at 50 DDIM steps with classifier-free guidance): measured per-step time × 50 + decode.

Figures are throughputs and ratios, never pass/fail thresholds.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "bundle" / "configs" / "radiomics_params.yaml"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def bench_data(work: Path, n_studies: int, cores: int) -> list[tuple[str, str, str]]:
    from custom.data.phantom import generate_phantom_dataset
    from custom.data.prepare import PrepareWorkflow
    from custom.features.radiomics import LesionJob, extract_features

    phantom = work / "phantom"
    generate_phantom_dataset(phantom, n_studies=n_studies, seed=123, progress=False)
    rows = []
    for workers in sorted({1, cores}):
        out = work / f"prep{workers}"
        wf = PrepareWorkflow(str(phantom), str(out), str(PARAMS), num_workers=workers, progress=False, preview_cases=0)
        cases, _, _ = wf.load_cases()
        t = time.perf_counter()
        records, skipped, _ = wf.preprocess(cases)
        dt = time.perf_counter() - t
        rows.append((f"preprocessing, {workers} process(es)", f"{len(records) / dt:.2f} images/s",
                     f"{len(records)} images of 640x512 -> 256x256 ({len(skipped)} skipped), incl. process start-up"))
        if workers == cores:
            jobs = [LesionJob(r["case_id"], str(out / r["image"]), str(out / r["lesions"])) for r in records if r["num_lesions"]]
    for workers in sorted({1, cores}):
        t = time.perf_counter()
        res = extract_features(jobs, PARAMS, cache_dir=None, num_workers=workers, progress=False, mp_context="spawn")
        dt = time.perf_counter() - t
        n = len(res.rows)
        rows.append((f"radiomics, {workers} process(es)", f"{n / dt:.1f} lesions/s",
                     f"{n} lesions at 256x256, 67 features each, cache off, incl. process start-up"))
    return rows


def _parse(files: list[str], **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO / f) for f in files])
    for key, value in overrides.items():
        parser[key] = value
    return parser


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def bench_models(name: str, extra: list[str], repeats: int, device: str = "cpu") -> list[tuple[str, str, str]]:
    import torch
    import torch.nn.functional as F

    ae_files = ["bundle/configs/common.json", "bundle/configs/train_autoencoder.json", *extra]
    dm_files = ["bundle/configs/common.json", "bundle/configs/train_diffusion.json", *extra]
    p1 = _parse(ae_files, device=f"$torch.device('{device}')")
    size = int(p1.get_parsed_content("image_size"))
    b1 = 1 if name == "paper" else int(p1.get_parsed_content("batch_size"))
    ae = p1.get_parsed_content("autoencoder_def").to(device)
    opt = torch.optim.SGD(ae.parameters(), 1e-4)  # stateless: the paper-scale step fits in 24 GB
    x = torch.rand(b1, 1, size, size, device=device)

    def stage1_step():
        recon, mu, sigma = ae(x)
        loss = F.l1_loss(recon, x) + 1e-6 * (0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-8) - 1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t1 = _timed(stage1_step, repeats)
    rows = [(f"stage 1 training step, {name} config", f"{b1 / t1:.2f} images/s", f"{size}x{size}, batch {b1}")]
    del opt

    p2 = _parse(dm_files, device=f"$torch.device('{device}')")
    b2 = 1 if name == "paper" else int(p2.get_parsed_content("batch_size"))
    net = p2.get_parsed_content("network_def").to(device)
    lat_c = int(p2.get_parsed_content("latent_channels"))
    mask_c = int(p2.get_parsed_content("mask_latent_channels"))
    max_l = int(p2.get_parsed_content("max_lesions"))
    h = size // 4
    with torch.no_grad():
        h = int(ae.encode_stage_2_inputs(x[:1]).shape[-1])
    cond = {
        "mask_latent": torch.randn(b2, mask_c, h, h, device=device),
        "features": torch.rand(b2, max_l, 67, device=device),
        "lesion_masks": (torch.rand(b2, max_l, size, size, device=device) > 0.9).float(),
        "lesion_present": torch.ones(b2, max_l, device=device),
    }
    z = torch.randn(b2, lat_c, h, h, device=device)
    t = torch.randint(0, 1000, (b2,), device=device)
    opt = torch.optim.SGD([q for q in net.parameters() if q.requires_grad], 1e-4)
    images = torch.rand(b2, 1, size, size, device=device)

    def stage2_step():
        loss = F.mse_loss(net(z, t, **cond), z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def stage2_step_encoding():
        with torch.no_grad():
            ae.encode_stage_2_inputs(images)
            ae.encode_stage_2_inputs(images.repeat(3, 1, 1, 1))  # the 3 soft-mask channels
        stage2_step()

    ae.eval()
    t2 = _timed(stage2_step, repeats)
    t2e = _timed(stage2_step_encoding, repeats)
    rows.append((f"stage 2 training step, {name} config", f"{b2 / t2:.2f} images/s",
                 f"{size}x{size} -> {lat_c}x{h}x{h} latents, batch {b2}, cached latents"))
    rows.append((f"latent cache effect, {name} config", f"{t2e / t2:.2f}x faster steps",
                 "step time encoding image + soft mask on the fly / step time with cached latents"))
    del opt

    net.eval()
    one = {k: v[:1] for k, v in cond.items()}
    two = {k: torch.cat([v, v]) for k, v in one.items()}
    flags = torch.tensor([False, True], device=device)

    @torch.no_grad()
    def guided_step():
        net(torch.cat([z[:1], z[:1]]), torch.cat([t[:1], t[:1]]), **two, drop_features=flags, drop_mask=flags)

    per_step = _timed(guided_step, repeats)
    with torch.no_grad():
        t0 = time.perf_counter()
        ae.decode_stage_2_outputs(z[:1])
        decode = time.perf_counter() - t0
    rows.append((f"sampling latency, {name} config", f"{50 * per_step + decode:.1f} s/image",
                 f"50 DDIM steps with CFG (batch 2 per step): 50 x {per_step:.3f} s measured per step + {decode:.2f} s decode"))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default=str(REPO / "bundle" / "docs" / "benchmarks.md"))
    ap.add_argument("--n_studies", type=int, default=10, help="phantom studies (4 images each) for the data benchmarks")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions per model measurement (after a warm-up)")
    ap.add_argument("--skip_paper", action="store_true", help="leave out the paper-scale configs (slow on a CPU)")
    args = ap.parse_args(argv)
    import torch

    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="mammo_bench_"))
    try:
        rows = bench_data(work, args.n_studies, cores)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows += bench_models("default", [], args.repeats, device)
    if not args.skip_paper:
        rows += bench_models("paper", ["bundle/configs/paper.json"], 1, device)

    lines = [
        "# Benchmarks",
        "",
        f"Measured by `make bench` on {time.strftime('%Y-%m-%d')}: {_cpu_name()}, {cores} cores, "
        f"torch {torch.__version__}, device {device}. Phantom data (synthetic); throughputs, not pass/fail limits. "
        "Model steps run on random inputs of the configs' shapes (data loading excluded, plain SGD step).",
        "",
        "| what | throughput | notes |",
        "| --- | --- | --- |",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
    ]
    from custom.io import atomic_write_text

    atomic_write_text(args.output, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
