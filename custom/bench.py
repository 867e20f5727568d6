"""Benchmarks (``make bench``): throughput figures written to ``bundle/docs/benchmarks.md``.

Measures, on this machine, with the phantom dataset:

- preprocessing throughput (images/s): DICOM read + grayscale + breast mask + geometry + writing, 1 process vs all
  cores;
- radiomics throughput (lesions/s): 67 features per lesion, 1 process vs all cores, cache off.

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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default=str(REPO / "bundle" / "docs" / "benchmarks.md"))
    ap.add_argument("--n_studies", type=int, default=10, help="phantom studies (4 images each) for the data benchmarks")
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="mammo_bench_"))
    try:
        rows = bench_data(work, args.n_studies, cores)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import torch

    lines = [
        "# Benchmarks",
        "",
        f"Measured by `make bench` on {time.strftime('%Y-%m-%d')}: {_cpu_name()}, {cores} cores, no GPU, "
        f"torch {torch.__version__}. Phantom data (synthetic); throughputs, not pass/fail limits.",
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
