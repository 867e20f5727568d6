"""The steps-vs-quality study driver: option parsing (checked before any evaluation runs) and its outputs."""

from __future__ import annotations

import json

import pytest

from custom.engines.steps_study import main, parse_setting, write_outputs


def test_parse_setting_maps_names_and_rejects_unknown():
    assert parse_setting("eta=1.0,guidance=1") == {"ddim_eta": 1.0, "guidance_scale": 1.0}
    assert parse_setting("steps=10") == {"ddim_steps": 10}
    with pytest.raises(ValueError, match="unknown name 'temperature'"):
        parse_setting("temperature=2")
    with pytest.raises(ValueError, match="expected name=value"):
        parse_setting("eta")


def test_bad_options_fail_before_any_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--prepared_dir", str(tmp_path), "--ckpt_dir", str(tmp_path), "--output_dir", str(tmp_path / "o")])
    assert "autoencoder.pt not found" in capsys.readouterr().err
    for name in ("autoencoder.pt", "model.pt", "segmenter.pt"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(SystemExit):  # no diffusion_info.json: the model's image size is unknown
        main(["--prepared_dir", str(tmp_path), "--ckpt_dir", str(tmp_path), "--output_dir", str(tmp_path / "o")])
    assert "no image_size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--prepared_dir", str(tmp_path), "--ckpt_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"), "--steps", "0"])
    with pytest.raises(SystemExit):
        main(["--prepared_dir", str(tmp_path), "--ckpt_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"),
              "--pndm_steps", "10", "0"])
    assert "--pndm_steps: every value must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_outputs_table_curve_and_json(tmp_path):
    rows = [{"setting": f"steps{s}", "ddim_steps": s, "seconds": 1.0, "mass_iou": 0.5 + s / 100, "ceiling_mass_iou": 0.9,
             "fd_radiomics67": 10.0 - s / 10, "ms_ssim": 0.9, "breast_iou": 0.95, "metrics_file": "x"} for s in (10, 20)]
    rows.append({"setting": "steps20_eta1.0", "ddim_steps": 20, "ddim_eta": 1.0, "seconds": 1.0, "mass_iou": None,
                 "ceiling_mass_iou": None, "fd_radiomics67": None, "ms_ssim": 0.8, "breast_iou": None, "metrics_file": "y"})
    rows.append({"setting": "pndm10", "sampler": "pndm", "ddim_steps": 10, "seconds": 1.0, "mass_iou": 0.6,
                 "ceiling_mass_iou": 0.9, "fd_radiomics67": 9.5, "ms_ssim": 0.85, "breast_iou": 0.95, "metrics_file": "z"})
    refs = {"image_size": 128, "real_pairs_ms_ssim": 0.4, "texture_siblings_ms_ssim": 0.75}
    write_outputs(rows, refs, tmp_path)
    data = json.loads((tmp_path / "steps_study.json").read_text())
    assert data["references"] == refs and len(data["rows"]) == 4
    table = (tmp_path / "steps_study.md").read_text()
    assert "| steps10 | ddim | 10 | config |" in table and "| steps20_eta1.0 | ddim | 20 | 1.0 |" in table
    assert "| pndm10 | pndm | 10 | n/a | config | 0.6000 (0.9000) |" in table
    assert "at 128 px" in table and "0.4000" in table and "0.7500" in table
    assert (tmp_path / "steps_vs_quality.png").stat().st_size > 1000
