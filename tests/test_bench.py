"""Smoke run of ``make bench`` at toy sizes: every section runs and writes its table rows (no timed assertions)."""

from __future__ import annotations

import re
from pathlib import Path

REPO_DOCS = Path(__file__).resolve().parents[1] / "bundle" / "docs" / "benchmarks.md"


def test_bench_tiny_writes_every_section(tmp_path):
    from custom.bench import main

    out = tmp_path / "bench.md"
    main(["--tiny", "--repeats", "1", "--skip_paper", "--output", str(out)])
    text = out.read_text()
    assert text.startswith("# Benchmarks") and "Load average" in text and "cores" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| what")]
    names = " ".join(r.split("|")[1] for r in rows)
    for expected in ("GEMM peak", "parameters, default UNet", "training step, default UNet", "sampling step (CFG forward)",
                     "achieved FLOP/s", "sampling, default config", "batching the rows", "lesion context once",
                     "radiomics, 1 process", "preprocessing 204x166 uncompressed", "preprocessing 204x166 JPEG 2000",
                     "JPEG 2000, reduced decoding"):
        assert expected in names, expected
    # the peer comparison has the diffusers column and identical parameter counts
    params = next(r for r in rows if "parameters, default UNet" in r)
    got = re.findall(r"project ([\d.]+) M / diffusers ([\d.]+) M", params)
    assert got and got[0][0] == got[0][1] and "identical configuration" in params
    assert all("nan" not in r.split("|")[2] for r in rows)
    # the preprocessing rows are ratios to the pydicom+numpy baseline, per core, with the reduced decoding's agreement
    reduced = next(r for r in rows if "reduced decoding" in r)
    assert "x the pydicom+numpy baseline" in reduced and re.search(r"PSNR [\d.]+ dB", reduced)
    assert re.search(r"breast IoU 0\.9\d+|breast IoU 1\.0", reduced)


def test_diffusers_peer_has_the_projects_parameter_count():
    """The peer is the same network: diffusers' UNet2DConditionModel built from the bundle's unet_kwargs has exactly
    the parameter count of MONAI's DiffusionModelUNet, for the default and the paper configuration."""
    import diffusers  # a test dependency (pyproject [test])
    from monai.networks.nets import DiffusionModelUNet

    from custom.bench import unet_shapes

    for name in ("default", "paper"):
        cfg = unet_shapes(name)
        ours = DiffusionModelUNet(spatial_dims=2, in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
                                  with_conditioning=True, cross_attention_dim=cfg["cross"], **cfg["monai"])
        peer = diffusers.UNet2DConditionModel(**cfg["diffusers"])
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in peer.parameters()), name


def test_bench_rerun_keeps_the_marked_sections(tmp_path):
    """``make bench`` rewrites its own table and keeps the sections other commands wrote between markers
    (the GPU check, the MONAI Label latency bench), in their order; unmarked text is the bench's own and goes."""
    from custom.bench import kept_sections

    previous = ("# Benchmarks\nold table\n<!-- serving-bench:begin -->\n## latency\n| 1 |\n<!-- serving-bench:end -->\n"
                "loose text\n<!-- gpu-check:begin -->\n## GPU\nrow\n<!-- gpu-check:end -->\n<!-- broken:begin -->\nx\n")
    kept = kept_sections(previous)
    assert kept == ["<!-- serving-bench:begin -->\n## latency\n| 1 |\n<!-- serving-bench:end -->",
                    "<!-- gpu-check:begin -->\n## GPU\nrow\n<!-- gpu-check:end -->"]
    names = [k.split(":begin", 1)[0][5:] for k in kept_sections(REPO_DOCS.read_text())]
    assert {"serving-bench", "preprocessing-notes", "gpu-check", "hand-timed-0.7", "hand-timed-0.8"} <= set(names)
    # a dotted name (the hand-timed sections of a release) is kept too
    assert kept_sections("<!-- hand-timed-0.8:begin -->\nrow\n<!-- hand-timed-0.8:end -->") == [
        "<!-- hand-timed-0.8:begin -->\nrow\n<!-- hand-timed-0.8:end -->"]
