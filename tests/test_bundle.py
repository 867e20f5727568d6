"""The bundle as MONAI's tools use it: run from another folder with ``--bundle_root``, loaded from a zip with
``monai.bundle.download`` + ``monai.bundle.load``, ``check_properties``, unknown options refused, strict loading.

The tiny models are the session's (``conftest.build_tiny_models``, trained by the real configs)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_models

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"


@pytest.fixture(scope="module")
def models(prepared_dir, tmp_path_factory) -> Path:
    return build_tiny_models(Path(prepared_dir), tmp_path_factory.getbasetemp() / "gcdm_tiny_models", segmenter=True)


def _copy_bundle(models: Path, dest: Path) -> Path:
    """A bundle folder outside the repository: configs, docs, LICENSE and the trained files."""
    shutil.copytree(CONFIGS, dest / "configs")
    shutil.copytree(BUNDLE / "docs", dest / "docs", ignore=shutil.ignore_patterns("images"))
    shutil.copy(BUNDLE / "LICENSE", dest / "LICENSE")
    (dest / "models").mkdir()
    for f in Path(models).iterdir():  # weights with their .sha256, the model's normaliser and side files
        if f.is_file():
            shutil.copy(f, dest / "models" / f.name)
    return dest


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def test_inference_and_evaluation_run_from_a_folder_outside_the_repository(models, prepared_dir, tmp_path):
    bundle = _copy_bundle(models, tmp_path / "mammo_gcdm")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    case = json.loads((Path(prepared_dir) / "datalist.json").read_text())["test"][0]
    prepared = Path(prepared_dir)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", str(bundle / "configs" / "inference.json"),
           "--bundle_root", str(bundle), "--mask_file", str(prepared / case["label"]), "--lesion_mask_file", str(prepared / case["lesions"]),
           "--feature_file", str(prepared / "features.csv"), "--feature_case_id", case["case_id"],
           "--normaliser_file", str(prepared / "feature_normalisation.json"), "--ddim_steps", "2", "--progress", "False",
           "--formats", "['png']"]
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pngs = list((bundle / "runs" / "inference").glob("*.png"))  # outputs under the bundle's output_root
    assert len(pngs) == 1 and not any(cwd.iterdir())

    cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluate", "--config_file", str(bundle / "configs" / "evaluate.json"),
           "--bundle_root", str(bundle), "--prepared_dir", str(prepared), "--results_dir", "results", "--ddim_steps", "2",
           "--max_cases", "2", "--diversity_cases", "1", "--diversity_samples", "2", "--figure_cases", "2",
           "--progress", "False"]
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = list((cwd / "results").rglob("metrics.json"))  # a relative path is relative to the working directory
    assert len(metrics) == 1 and json.loads(metrics[0].read_text())["settings"]["max_cases"] == 2


def _zip(folder: Path, path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(folder.parent))
    return path


def test_a_zipped_bundle_loads_the_network_its_own_configs_describe(models, tmp_path, monkeypatch):
    from monai.bundle import download, load

    from custom.checkpoints import load_checkpoint, write_checksum

    archive = _zip(_copy_bundle(models, tmp_path / "src" / "mammo_gcdm"), tmp_path / "mammo_gcdm.zip")
    store = tmp_path / "store"
    download(name="mammo_gcdm", bundle_dir=str(store), url=archive.as_uri(), progress=False)
    monkeypatch.chdir(tmp_path)  # neither the repository root nor the bundle
    net = load("mammo_gcdm", bundle_dir=str(store), workflow_type="inference", key_in_ckpt="model", device="cpu",
               progress=False)
    ckpt = load_checkpoint(store / "mammo_gcdm" / "models" / "model.pt")
    state = net.state_dict()
    assert set(state) == set(ckpt["model"]) and all(torch.equal(state[k].cpu(), ckpt["model"][k]) for k in state)

    # a checkpoint whose record disagrees with its weights (another configuration) fails loudly, never partly
    bad = dict(ckpt)
    bad["model_config"] = json.dumps(dict(json.loads(ckpt["model_config"]), cross_attention_dim=8))
    torch.save(bad, store / "mammo_gcdm" / "models" / "model.pt")
    write_checksum(store / "mammo_gcdm" / "models" / "model.pt")  # vouched for: the record check is what must fail
    with pytest.raises(Exception) as info:
        load("mammo_gcdm", bundle_dir=str(store), workflow_type="inference", key_in_ckpt="model", device="cpu",
             progress=False)
    chain, err = [], info.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    assert any("does not match the configured network" in m and "shape mismatch" in m for m in chain)


def test_check_properties_pass_for_inference_and_both_training_stages(models, prepared_dir, tmp_path):
    from monai.bundle import ConfigWorkflow

    prepared = Path(prepared_dir)
    wf = ConfigWorkflow(config_file=str(CONFIGS / "inference.json"), workflow_type="inference", logging_file=False,
                        ckpt_dir=str(models), normaliser_file=str(prepared / "feature_normalisation.json"),
                        datalist=str(prepared / "datalist.json"), split="test", max_cases=1)
    wf.initialize()
    assert wf.check_properties() == []
    wf = ConfigWorkflow(config_file=[str(CONFIGS / "common.json"), str(CONFIGS / "train_diffusion.json"),
                                     str(REPO / "tests" / "configs" / "inf_tiny.json")],
                        workflow_type="train", logging_file=False, ckpt_dir=str(models), prepared_dir=str(prepared_dir),
                        output_root=str(tmp_path), latent_cache_dir=str(tmp_path / "cache"), cache_workers=0,
                        train_limit=2, val_limit=2, batch_size=2)
    wf.initialize()
    assert wf.check_properties() == []
    wf = ConfigWorkflow(config_file=[str(CONFIGS / "common.json"), str(CONFIGS / "train_autoencoder.json"),
                                     str(REPO / "tests" / "configs" / "inf_tiny.json")],
                        workflow_type="train", logging_file=False, ckpt_dir=str(tmp_path / "ae"),
                        prepared_dir=str(prepared_dir), output_root=str(tmp_path), adversarial_weight=0.0)
    wf.initialize()
    assert wf.check_properties() == []


def test_stage2_rejects_a_stage1_option_instead_of_ignoring_it(models, prepared_dir, tmp_path):
    from monai.bundle import run

    from custom.engines.inference import describe_error

    with pytest.raises(Exception) as info:
        run("run", config_file=[str(CONFIGS / "common.json"), str(CONFIGS / "train_diffusion.json")], logging_file=False,
            meta_file=str(CONFIGS / "metadata.json"), prepared_dir=str(prepared_dir), ckpt_dir=str(models),
            output_root=str(tmp_path), accumulation_steps=4)
    msg = describe_error(info.value)
    assert msg is not None and "--accumulation_steps" in msg and "train_diffusion.json" in msg
    assert not any(tmp_path.iterdir())


def test_bundle_root_is_the_folder_of_the_running_configs(tmp_path):
    from monai.bundle import ConfigParser, ConfigWorkflow

    dest = tmp_path / "b"
    shutil.copytree(CONFIGS, dest / "configs")
    wf = ConfigWorkflow(config_file=str(dest / "configs" / "inference.json"), workflow_type="inference", logging_file=False)
    wf.initialize()
    assert wf.bundle_root == str(dest.resolve())  # resolved inside the workflow, as run() and load() do
    p = ConfigParser()  # outside a workflow: the model-zoo default "."
    p.read_config(str(dest / "configs" / "inference.json"))
    assert p.get_parsed_content("bundle_root") == "."


def test_tracking_mlflow_records_both_training_stages_and_inference(models, prepared_dir, tmp_path):
    """``--tracking mlflow`` (MONAI's built-in settings, SQLite store in tmp) on stage 1 and stage 2, and the shipped
    ``configs/mlflow_tracking.json`` on inference: each workflow is one mlflow run with its loss per iteration."""
    pytest.importorskip("mlflow", reason="the optional 'tracking' extra")
    from mlflow.tracking import MlflowClient
    from monai.bundle import run
    from monai.utils import path_to_sqlite_uri

    uri = path_to_sqlite_uri(str(tmp_path / "mlruns.db"))
    ckpt = tmp_path / "models"
    common = dict(meta_file=str(CONFIGS / "metadata.json"), logging_file=False, prepared_dir=str(prepared_dir),
                  ckpt_dir=str(ckpt), output_root=str(tmp_path / "runs"), tracking="mlflow", tracking_uri=uri,
                  output_dir=str(tmp_path / "tracked"))
    tiny = str(REPO / "tests" / "configs" / "inf_tiny.json")
    run("run", config_file=[str(CONFIGS / "common.json"), str(CONFIGS / "train_autoencoder.json"), tiny], max_epochs=1,
        batch_size=4, checkpoint_interval=0, num_grid_images=2, discriminator_channels=8, discriminator_layers=2,
        adversarial_weight=0.0, amp=False, experiment_name="stage1", **common)
    run("run", config_file=[str(CONFIGS / "common.json"), str(CONFIGS / "train_diffusion.json"), tiny],
        latent_cache_dir=str(tmp_path / "cache"), train_limit=2, val_limit=2, batch_size=2, max_epochs=1, warmup_steps=1,
        val_interval=1, save_interval=1, sample_interval=0, cache_workers=0, experiment_name="stage2", **common)
    client = MlflowClient(tracking_uri=uri)
    for name in ("stage1", "stage2"):
        exp = client.get_experiment_by_name(name)
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 1, name
        hist = client.get_metric_history(runs[0].info.run_id, "train_loss")
        assert hist and all(math.isfinite(v.value) for v in hist), name  # a number per iteration, not a tuple

    run("run", config_file=str(CONFIGS / "inference.json"), tracking=str(CONFIGS / "mlflow_tracking.json"),
        logging_file=False, meta_file=str(CONFIGS / "metadata.json"), ckpt_dir=str(ckpt), ddim_steps=2,
        output_root=str(tmp_path / "inference_runs"), datalist=str(Path(prepared_dir) / "datalist.json"), split="test",
        max_cases=1, progress=False, output_dir=str(tmp_path / "generated"), formats=["png"])
    client = MlflowClient(tracking_uri=path_to_sqlite_uri(str(tmp_path / "inference_runs" / "mlflow" / "mlruns.db")))
    exp = client.get_experiment_by_name("mammo_gcdm")
    assert exp is not None and len(client.search_runs([exp.experiment_id])) == 1
    assert len(list((tmp_path / "generated").glob("*.png"))) == 1


def test_export_writes_a_program_with_the_networks_outputs(models, tmp_path):
    """``run export``: torch.export of the strictly loaded denoiser; the file read back gives the same outputs as the
    network on fresh inputs (checked here independently of the export step's own check)."""
    from monai.bundle import run

    from custom.workflows.bundle import BundleModel
    from custom.workflows.export import example_inputs

    out = tmp_path / "model.pt2"
    run("export", config_file=str(CONFIGS / "inference.json"), logging_file=False, meta_file=str(CONFIGS / "metadata.json"),
        ckpt_dir=str(models), export_path=str(out))
    model = BundleModel(BUNDLE, models / "model.pt", models / "autoencoder.pt")
    program = torch.export.load(str(out))
    args, kwargs = example_inputs(model, batch=2, seed=7)  # the program was traced with static shapes at batch 2
    with torch.no_grad():
        a = model.network(*args, **kwargs)
        b = program.module()(*args, **kwargs)
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5) and float(a.abs().max()) > 0


def test_relocated_stage1_check_names_the_first_relocated_key(tmp_path, caplog):
    """``BundleModel._check_relocated`` alone (no model built): the digest of the relocated weights must equal the
    one ``diffusion_info.json`` records; a mismatch names the first relocated option (name order) and its path."""
    import logging
    from types import SimpleNamespace

    from custom.errors import MammoInputError
    from custom.workflows.bundle import BundleModel

    (tmp_path / "diffusion_info.json").write_text(json.dumps({"stage1_checkpoint_sha256": "ab" * 32}))
    bm = BundleModel.__new__(BundleModel)
    bm.model_path = tmp_path / "model.pt"
    bm.relocated = {"sd_path": {"trained": "/train/sd.ckpt", "configured": "/here/sd.ckpt"},
                    "clip_path": {"trained": "/train/clip", "configured": "/here/clip"}}
    with pytest.raises(MammoInputError, match=r"--clip_path: not the weights this model was trained with") as err:
        bm._check_relocated(SimpleNamespace(checkpoint_digest="cd" * 32))
    assert "/here/clip" in str(err.value) and "SHA-256 cdcdcdcdcdcd" in str(err.value)
    with caplog.at_level(logging.INFO, logger="custom.workflows.bundle"):
        bm._check_relocated(SimpleNamespace(checkpoint_digest="ab" * 32))
    assert "stage 1 read from /here/clip (trained with /train/clip): same weights (SHA-256 abababababab" in caplog.text


def test_package_version_is_the_bundle_version():
    """Sidecars, prepared records and exports write ``custom.__version__``: it must be the version that
    metadata.json and pyproject.toml give (it said 0.6.0 through 0.9.1)."""
    import tomllib

    import custom

    root = Path(__file__).resolve().parents[1]
    meta = json.loads((root / "bundle" / "configs" / "metadata.json").read_text())
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert custom.__version__ == meta["version"] == project["version"]
    assert meta["version"] in meta["changelog"]
