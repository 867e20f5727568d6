"""The GPU check's CPU smoke mode, its FLOP counting, its diffusers twin and its refusal without CUDA."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from custom import gpu_check


def test_count_flops_linear_forward_backward():
    """Linear(16 -> 8) on 4 rows: forward 2*4*16*8 FLOPs; backward needs only the weight gradient (input has no
    grad): another 2*4*16*8; the bias gradient is a reduction, not counted."""
    lin = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    assert gpu_check.count_flops(lambda: lin(x).sum().backward()) == 2 * (2 * 4 * 16 * 8)


def test_write_section_replaces_between_markers(tmp_path):
    md = tmp_path / "b.md"
    md.write_text("# Benchmarks\n\nkeep me\n")
    gpu_check.write_section(md, "first")
    gpu_check.write_section(md, "second")
    text = md.read_text()
    assert "keep me" in text and "second" in text and "first" not in text
    assert text.count(gpu_check.BEGIN) == 1 and text.count(gpu_check.END) == 1


def test_diffusers_twin_has_identical_configuration():
    """The diffusers twin of an SD-v1-structured MONAI UNet holds exactly as many parameters, level by level."""
    pytest.importorskip("diffusers")
    from monai.networks.nets import DiffusionModelUNet

    unet = DiffusionModelUNet(spatial_dims=2, in_channels=8, out_channels=4, with_conditioning=True,
                              cross_attention_dim=16, **gpu_check.SMOKE_UNET)
    twin = gpu_check.diffusers_twin(unet, torch.device("cpu"), norm_eps=1e-6)
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in twin.parameters())
    assert twin.config.in_channels == 8 and twin.config.cross_attention_dim == 16


def test_refuses_without_cuda(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "ERROR: gpu_check: no CUDA device" in capsys.readouterr().err


def test_cpu_smoke_writes_one_table(tmp_path):
    md, js = tmp_path / "benchmarks.md", tmp_path / "rows.json"
    md.write_text("# Benchmarks\n\nother section\n")
    assert gpu_check.main(["--cpu-smoke", "--output", str(md), "--json", str(js)]) == 0
    rows = {r[0]: r[1] for r in json.loads(js.read_text())["rows"]}
    assert any(k.startswith("stage-2 training step") and "images/s" in v for k, v in rows.items())
    assert any(k.startswith("sampling 2 images") and "s/image" in v for k, v in rows.items())
    assert any(k.startswith("UNet training step") and "×" in v for k, v in rows.items())
    diff = rows["MONAI UNet with the diffusers twin's weights (SD key map)"]
    assert float(diff.split("=")[1]) <= 1e-4
    assert any(k.startswith("DDP training, 1 process") and "images/s" in v for k, v in rows.items())
    text = md.read_text()
    assert "other section" in text and "| training MFU |" in text and "CPU" in text
