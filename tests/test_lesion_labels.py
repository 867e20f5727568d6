"""Per-lesion labels (category, BI-RADS per lesion slot): parsing against hand-written cases, slot codes from a
prepared datalist, the slot-label embedding added to its slot's tokens (checked against a hand-built context), a tiny
network that learns to read a slot's BI-RADS, and the bundle path (train with lesion_label_names, infer with
--lesion_labels, sidecar, bad input)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import INFERENCE_TINY_CONFIG, build_tiny_models
from custom.data.lesion_labels import (
    LESION_LABELS,
    attach_lesion_labels,
    check_lesion_label_names,
    decode_lesion_labels,
    encode_lesion_labels,
    labels_from_finding,
    parse_lesion_labels,
)
from custom.errors import MammoInputError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
LABELS = ["lesion_category", "lesion_birads"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _msg(fn) -> str:
    with pytest.raises(MammoInputError) as info:
        fn()
    return str(info.value)


# ------------------------------------------------------------------------------------------------ parsing
def test_parse_lesion_labels_hand_written_cases():
    assert parse_lesion_labels("birads=4,category=mass; birads=2") == [
        {"lesion_birads": "4", "lesion_category": "mass"}, {"lesion_birads": "2"}]
    assert parse_lesion_labels(" ; BI-RADS=4C") == [{}, {"lesion_birads": "4"}]  # lesion 0 not given
    assert parse_lesion_labels('[{"birads": 5}, null, {"category": "Architectural distortion"}]') == [
        {"lesion_birads": "5"}, {}, {"lesion_category": "distortion"}]
    assert parse_lesion_labels([{"lesion_birads": "BI-RADS 3"}]) == [{"lesion_birads": "3"}]
    assert parse_lesion_labels(None) == [] and parse_lesion_labels("") == [{}]
    assert "remove" in _msg(lambda: parse_lesion_labels("birads=none"))
    assert _msg(lambda: parse_lesion_labels("colour=red")).startswith("lesion_labels: unknown lesion label 'colour'")
    assert "name=value" in _msg(lambda: parse_lesion_labels("birads 4"))
    assert "given twice" in _msg(lambda: parse_lesion_labels("birads=4,bi-rads=5"))
    assert "'7'" in _msg(lambda: parse_lesion_labels("birads=7"))
    assert "mapping" in _msg(lambda: parse_lesion_labels([4]))
    assert "JSON" in _msg(lambda: parse_lesion_labels("[{birads: 4}"))
    assert check_lesion_label_names(["birads", "category"]) == ["lesion_birads", "lesion_category"]
    assert "twice" in _msg(lambda: check_lesion_label_names(["birads", "lesion_birads"]))


def test_labels_of_dataset_findings():
    assert labels_from_finding({"category": "Mass", "birads": "BI-RADS 4"}) == {"lesion_category": "mass",
                                                                                "lesion_birads": "4"}
    assert labels_from_finding({"category": "['Suspicious Calcification']", "birads": "BI-RADS 5"}) == {
        "lesion_category": "calcification", "lesion_birads": "5"}
    # prepare's "lesion" of a mask-file dataset, an empty BI-RADS and VinDr's BI-RADS 1 on a finding: not given
    assert labels_from_finding({"category": "lesion", "birads": None}) == {}
    assert labels_from_finding({"category": "Mass", "birads": "BI-RADS 1"}) == {"lesion_category": "mass"}


def test_encode_decode_slot_codes():
    codes = encode_lesion_labels([{"lesion_birads": "2", "lesion_category": "mass"}, {"lesion_birads": "5"}],
                                 LABELS, max_lesions=3, num_lesions=2)
    # hand-computed: category index in (mass, calcification, ...), BI-RADS index in (2, 3, 4, 5); -1 = not given
    assert codes.dtype == np.int64 and codes.tolist() == [[0, 0], [-1, 3], [-1, -1]]
    assert decode_lesion_labels(codes, LABELS) == [{"lesion_category": "mass", "lesion_birads": "2"},
                                                   {"lesion_birads": "5"}, {}]
    assert LESION_LABELS["lesion_birads"] == ("2", "3", "4", "5") and "none" not in LESION_LABELS["lesion_category"]
    msg = _msg(lambda: encode_lesion_labels([{}, {"lesion_birads": "4"}], LABELS, max_lesions=2, num_lesions=1))
    assert msg.startswith("lesion_labels:") and "the case has 1 lesion" in msg
    msg = _msg(lambda: encode_lesion_labels([{"lesion_category": "mass"}], ["lesion_birads"], max_lesions=2))
    assert "not trained with lesion label(s) lesion_category" in msg
    assert encode_lesion_labels([{}, {}], LABELS, max_lesions=2, num_lesions=0).tolist() == [[-1, -1]] * 2


def test_attach_slot_codes_from_prepared_datalist(prepared_dir):
    from custom.data.training import load_prepared_datalist

    items = load_prepared_datalist(prepared_dir, "training")
    assert attach_lesion_labels(items, prepared_dir, [], 2) == items  # off: unchanged
    out = attach_lesion_labels(items, prepared_dir, ["birads"], 2)
    entries = {e["case_id"]: e for e in json.loads((Path(prepared_dir) / "datalist.json").read_text())["training"]}
    seen = 0
    for it in out:
        codes = it["lesion_labels"]
        assert codes.shape == (2, 1)
        findings = sorted(entries[it["case_id"]]["findings"], key=lambda f: f["lesion_index"])
        for slot in range(2):
            if slot < len(findings):  # the phantom writes "BI-RADS n" per mass
                want = str(findings[slot]["birads"]).split()[-1]
                assert LESION_LABELS["lesion_birads"][codes[slot, 0]] == want
                seen += 1
            else:
                assert codes[slot, 0] == -1
            assert (codes[slot, 0] >= 0) == bool(it["lesion_present"][slot])
    assert seen > 0


# ------------------------------------------------------------------------------------------------ network
def _network(max_lesions=2, labels=("lesion_birads",), drop=0.0, mode="radiomics"):
    from custom.networks.gcdm import GCDMNetwork

    return GCDMNetwork(
        latent_channels=2, mask_latent_channels=0, max_lesions=max_lesions,
        conditioner={"mode": mode, "radiomic_dim": 67, "token_dim": 16, "num_tokens": 2, "hidden_dim": 16},
        unet_kwargs={"channels": [8, 8], "attention_levels": [False, True], "num_res_blocks": 1, "num_head_channels": 8,
                     "norm_num_groups": 4},
        lesion_labels=list(labels), lesion_label_drop={n: drop for n in labels}, lesion_label_mode="tokens",
    )


def test_slot_label_vector_is_added_to_its_slots_tokens():
    """Context = the conditioner's tokens of each slot + that slot's label row (null in an empty slot and in the
    unconditional branch; kept when only the features are dropped)."""
    torch.manual_seed(0)
    net = _network().eval()
    table = net.slot_labels.tables["lesion_birads"].weight
    null = table[len(LESION_LABELS["lesion_birads"])]
    b = 3
    feats = torch.rand(b, 2, 67)
    masks = torch.zeros(b, 2, 8, 8)
    present = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    codes = torch.tensor([[[3], [-1]], [[2], [1]], [[1], [1]]])
    drop_f = torch.tensor([False, True, False])
    drop_m = torch.tensor([False, False, False])
    with torch.no_grad():
        ctx = net.context(feats, masks, present, drop_f, drop_m, lesion_labels=codes)
        base = net.conditioner((feats * present[..., None]).reshape(b * 2, 67), masks.reshape(b * 2, 1, 8, 8),
                               drop_features=drop_f.repeat_interleave(2), drop_mask=drop_m.repeat_interleave(2))
        base = base.reshape(b, 2, 2, 16)
        # row 0: BI-RADS 5, not given; row 1: kept though its features are dropped, empty slot; row 2: both empty
        rows = [[table[3], null], [table[2], null], [null, null]]
        for i in range(b):
            for s in range(2):
                want = base[i, s] + rows[i][s]
                assert torch.allclose(ctx[i, 2 * s : 2 * s + 2], want, atol=1e-6), (i, s)
        both = torch.tensor([True, False, False])
        unc = net.context(feats, masks, present, both, both, lesion_labels=codes)
        nulls = net.context(feats, masks, present, both, both, lesion_labels=torch.tensor([[[-1], [-1]], *codes[1:]]))
        assert torch.allclose(unc, nulls) and not torch.allclose(unc[0], ctx[0])
    with pytest.raises(ValueError, match="lesion_labels"):
        net.context(feats, masks, present, drop_f, drop_m)  # the codes are required
    assert net.lesion_label_names == ("lesion_birads",)


def test_spatial_label_channels_hand_built():
    """lesion_label_mode "spatial": one more UNet input channel per label, (code + 1) / n_values over each lesion's
    area-pooled mask (largest where lesions overlap), 0 where not given, in empty slots, in the unconditional branch;
    the UNet sees exactly [x, that map]."""
    torch.manual_seed(0)
    net = _network(labels=("lesion_category", "lesion_birads"))
    spatial = __import__("custom.networks.gcdm", fromlist=["GCDMNetwork"]).GCDMNetwork(
        latent_channels=2, mask_latent_channels=0, max_lesions=2,
        conditioner={"mode": "radiomics", "radiomic_dim": 67, "token_dim": 16, "num_tokens": 2, "hidden_dim": 16},
        unet_kwargs={"channels": [8, 8], "attention_levels": [False, True], "num_res_blocks": 1, "num_head_channels": 8,
                     "norm_num_groups": 4},
        lesion_labels=["lesion_category", "lesion_birads"], lesion_label_mode="spatial").eval()
    assert spatial.unet.in_channels == 4 and net.unet.in_channels == 2 and spatial.slot_labels is None
    masks = torch.zeros(2, 2, 8, 8)
    masks[0, 0, 0:4, 0:4] = 1  # one latent cell (4x4 latent) fully, by area pooling
    masks[0, 1, 2:6, 2:6] = 1  # overlaps it
    masks[1, 0, 4:8, 0:2] = 1  # half of two latent cells
    present = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    codes = torch.tensor([[[0, 3], [-1, 1]], [[2, 0], [1, 1]]])  # (category, BI-RADS); row 1 slot 1 is empty
    got = spatial.label_channels(codes, masks, present, (4, 4))
    want = torch.zeros(2, 2, 4, 4)
    cat, bir = 5.0, 4.0  # values per label (mass..other; 2..5)
    a = torch.nn.functional.adaptive_avg_pool2d(masks, (4, 4))
    want[0, 0] = a[0, 0] * (1 / cat)                                    # slot 1's category not given
    want[0, 1] = torch.maximum(a[0, 0] * (4 / bir), a[0, 1] * (2 / bir))
    want[1, 0] = a[1, 0] * (3 / cat)
    want[1, 1] = a[1, 0] * (1 / bir)
    assert torch.allclose(got, want)
    both = torch.tensor([True, False])
    assert (spatial.label_channels(codes, masks, present, (4, 4), both, both)[0] == 0).all()
    x, t, feats = torch.randn(2, 2, 4, 4), torch.tensor([5, 500]), torch.rand(2, 2, 67)
    with torch.no_grad():  # random non-zero weights (MONAI zero-initialises the output convolution)
        for param in spatial.unet.parameters():
            param.add_(torch.randn_like(param) * 0.2)
        out = spatial(x, t, None, feats, masks, present, lesion_labels=codes)
        ref = spatial.unet(torch.cat([x, want], 1), t, context=spatial.context(feats, masks, present))
        other = spatial(x, t, None, feats, masks, present, lesion_labels=torch.tensor([[[0, 0], [-1, 1]], [[2, 0], [1, 1]]]))
    assert torch.allclose(out, ref, atol=1e-5)
    assert not torch.allclose(out[0], other[0]) and torch.allclose(out[1], other[1])  # only row 0's BI-RADS changed
    spatial.train()
    spatial.label_drop_rates.fill_(1.0)  # training drop: every label zeroed
    assert (spatial.label_channels(codes, masks, present, (4, 4)) == 0).all()


def test_tiny_network_learns_to_read_a_slots_birads():
    """Target noise +1 for a BI-RADS 5 lesion and -1 for BI-RADS 2 (same features and mask): after a few steps the
    prediction follows the slot's label; "not given" is the null row (the same as dropping the label)."""
    torch.manual_seed(0)
    net = _network(max_lesions=1, drop=0.2, mode="off")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    b = 8
    kw = dict(mask_latent=None, features=torch.full((b, 1, 67), 0.5), lesion_masks=torch.zeros(b, 1, 8, 8),
              lesion_present=torch.ones(b, 1))
    for _ in range(150):
        high = torch.randint(0, 2, (b,))
        codes = (high * 3).view(b, 1, 1)  # BI-RADS 2 -> 0, 5 -> 3
        target = (2.0 * high.float() - 1.0).view(b, 1, 1, 1).expand(b, 2, 8, 8)
        loss = torch.nn.functional.mse_loss(net(torch.randn(b, 2, 8, 8), torch.randint(0, 100, (b,)),
                                                lesion_labels=codes, **kw), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([50, 50])
    kw2 = {k: v[:2] for k, v in kw.items() if v is not None}
    with torch.no_grad():
        out = net(x, t, mask_latent=None, lesion_labels=torch.tensor([[[3]], [[0]]]), **kw2)
        assert out[0].mean() > 0.5 and out[1].mean() < -0.5
        not_given = net(x, t, mask_latent=None, lesion_labels=torch.full((2, 1, 1), -1), **kw2)
        base = net.conditioner(kw2["features"].reshape(2, 67), kw2["lesion_masks"].reshape(2, 1, 8, 8))
        dropped = net.slot_labels(torch.tensor([[3], [0]]), drop=torch.ones(2, 1, dtype=torch.bool))
        forced = net.unet(x, t, context=base + dropped[:, None, :])
        assert torch.allclose(not_given, forced, atol=1e-5)
        assert not_given[0].mean().abs() < out[0].mean().abs()


# ------------------------------------------------------------------------------------------------ bundle path
@pytest.fixture(scope="module")
def label_model(prepared_dir, tmp_path_factory) -> Path:
    """A tiny stage-2 model trained by the real configs with lesion_label_names (one epoch, beside the shared stage 1)."""
    import shutil

    from monai.bundle import run

    shared = build_tiny_models(Path(prepared_dir), tmp_path_factory.getbasetemp() / "gcdm_tiny_models")
    root = tmp_path_factory.mktemp("lesion_label_model")
    models = root / "models"
    models.mkdir()
    for name in ("autoencoder.pt", "autoencoder.pt.sha256"):
        shutil.copy(shared / name, models / name)
    run("training", config_file=[str(CONFIGS / "common.json"), str(CONFIGS / "train_diffusion.json"), str(INFERENCE_TINY_CONFIG)],
        meta_file=str(CONFIGS / "metadata.json"), logging_file=False, prepared_dir=str(prepared_dir), ckpt_dir=str(models),
        dm_output_dir=str(root / "dm"), latent_cache_dir=str(root / "cache"), lesion_label_names=LABELS,
        train_limit=2, val_limit=2, batch_size=2, max_epochs=1, warmup_steps=1, val_interval=1, save_interval=1,
        sample_interval=0, num_sample_cases=2, sample_ddim_steps=2, cache_workers=0)
    info = json.loads((models / "diffusion_info.json").read_text())
    assert info["lesion_label_names"] == LABELS
    return models


def _infer(models: Path, prepared_dir, **kw) -> None:
    from monai.bundle import run

    run("inference", config_file=[str(CONFIGS / "inference.json"), str(INFERENCE_TINY_CONFIG)],
        meta_file=str(CONFIGS / "metadata.json"), logging_file=False, ckpt_dir=str(models),
        normaliser_file=str(Path(prepared_dir) / "feature_normalisation.json"), ddim_steps=2, progress=False,
        map_to_source=False, formats=["png"], **kw)


def _one_lesion_case(prepared_dir) -> dict:
    entry = next(e for e in json.loads((Path(prepared_dir) / "datalist.json").read_text())["test"]
                 if e["num_lesions"] == 1)
    return {"mask_file": str(Path(prepared_dir) / entry["label"]),
            "lesion_mask_file": str(Path(prepared_dir) / entry["lesions"]),
            "feature_file": str(Path(prepared_dir) / "features.csv"), "feature_case_id": entry["case_id"]}


def test_lesion_labels_reach_the_model_and_the_sidecar(label_model, prepared_dir, tmp_path, monkeypatch):
    from custom.engines.inference import describe_error
    from custom.networks.gcdm import GCDMNetwork

    seen: list[torch.Tensor] = []
    real = GCDMNetwork._slot_codes

    def spy(self, codes, *args, **kwargs):
        seen.append(codes.detach().clone())
        return real(self, codes, *args, **kwargs)

    monkeypatch.setattr(GCDMNetwork, "_slot_codes", spy)
    case = _one_lesion_case(prepared_dir)
    out = tmp_path / "out"
    _infer(label_model, prepared_dir, case_id="lab", seed=1, output_dir=str(out),
           lesion_labels="birads=5,category=mass", **case)
    side = json.loads((out / "lab_seed1.json").read_text())
    assert side["parameters"]["lesion_labels"] == [{"lesion_category": "mass", "lesion_birads": "5"}]
    # the sampler's context: conditional row then unconditional row (the network nulls the latter itself);
    # slot 0 = mass (0), BI-RADS 5 (3); slot 1 empty: not given
    assert seen and all(c.shape == (2, 2, 2) for c in seen)
    assert seen[-1][0].tolist() == [[0, 3], [-1, -1]]
    seen.clear()
    _infer(label_model, prepared_dir, case_id="plain", seed=1, output_dir=str(out), **case)  # none given: the
    assert seen and seen[-1][0].tolist() == [[-1, -1], [-1, -1]]  # feature-file case has no findings of its own
    assert json.loads((out / "plain_seed1.json").read_text())["parameters"]["lesion_labels"] == [{}]  # said: none

    never = tmp_path / "never"
    for kw, start, words in (
        (dict(lesion_labels="birads=5; birads=3"), "lesion_labels:", "the case has 1 lesion"),
        (dict(lesion_labels="birads=none"), "lesion_labels", "remove"),
        (dict(lesion_labels="size=big"), "lesion_labels:", "unknown lesion label"),
    ):
        with pytest.raises(Exception) as info:
            _infer(label_model, prepared_dir, output_dir=str(never), **kw, **case)
        msg = describe_error(info.value)
        assert msg is not None and msg.startswith(start) and words in msg, msg
    assert not never.exists()


def test_a_model_without_lesion_labels_refuses_them(prepared_dir, tmp_path_factory, tmp_path):
    from custom.engines.inference import describe_error

    models = build_tiny_models(Path(prepared_dir), tmp_path_factory.getbasetemp() / "gcdm_tiny_models")
    with pytest.raises(Exception) as info:
        _infer(models, prepared_dir, output_dir=str(tmp_path / "never"), lesion_labels="birads=4",
               **_one_lesion_case(prepared_dir))
    msg = describe_error(info.value)
    assert msg is not None and msg.startswith("lesion_labels:") and "trained without lesion labels" in msg
    assert not (tmp_path / "never").exists()


def test_recipe_lesion_labels_by_hand():
    """A synthesis recipe's lesions are asked for what their record's findings will say: the lesion's own BI-RADS,
    else its malignancy's (benign -> 3, malignant -> 4); a BI-RADS outside the vocabulary (6) is not given."""
    from custom.engines.synthesize import recipe_lesion_labels

    recipe = {"case_id": "syn_000001", "malignancy": "benign", "lesions": [
        {"birads": "BI-RADS 5", "category": "Mass"}, {"birads": None, "category": "Mass"},
        {"birads": "BI-RADS 6", "category": None}]}
    assert recipe_lesion_labels(recipe, LABELS) == [
        {"lesion_category": "mass", "lesion_birads": "5"}, {"lesion_category": "mass", "lesion_birads": "3"},
        {"lesion_category": "mass"}]
    assert recipe_lesion_labels({**recipe, "malignancy": "malignant"}, ["lesion_birads"])[1] == {"lesion_birads": "4"}
    assert recipe_lesion_labels({"case_id": "x", "malignancy": None, "lesions": []}, LABELS) == []


def test_synthesize_asks_a_labelled_model_for_each_lesions_labels(label_model, prepared_dir, tmp_path, monkeypatch):
    """synthesize with a model trained with lesion labels: every lesion's category / BI-RADS from its recipe reaches
    the network's slot codes, and the record says what was asked (before: "not given" for every lesion while the
    record's findings named a BI-RADS)."""
    from monai.bundle import run

    from custom.networks.gcdm import GCDMNetwork

    seen: list[list] = []
    real = GCDMNetwork._slot_codes

    def spy(self, codes, *args, **kwargs):
        seen.extend(codes.detach().clone().tolist())
        return real(self, codes, *args, **kwargs)

    monkeypatch.setattr(GCDMNetwork, "_slot_codes", spy)
    out = tmp_path / "cohort"
    run("synthesize", config_file=[str(CONFIGS / "synthesize.json"), str(INFERENCE_TINY_CONFIG)],
        meta_file=str(CONFIGS / "metadata.json"), logging_file=False, ckpt_dir=str(label_model),
        prepared_dir=str(prepared_dir), output_dir=str(out), ddim_steps=2, progress=False, num_images=4, batch_size=2,
        seed=3, lesion_count_probs=[0.0, 0.5, 0.5])
    birads = {"BI-RADS 2": 0, "BI-RADS 3": 1, "BI-RADS 4": 2, "BI-RADS 5": 3}  # LESION_LABELS order, by hand
    category = {"mass": 0, "calcification": 1, "asymmetry": 2, "distortion": 3, "other": 4}
    records = [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]
    assert len(records) == 4 and all(r["findings"] for r in records)
    for rec in records:
        want = [[-1, -1], [-1, -1]]
        for f in rec["findings"]:
            want[f["lesion_index"]] = [category[f["category"].lower()], birads.get(f["birads"], -1)]
        assert want in seen, (rec["case_id"], want)
        assert rec["lesion_labels_requested"] == [
            {k: v for k, v in (("lesion_category", f["category"].lower()),
                               ("lesion_birads", f["birads"].split()[-1] if f["birads"] in birads else None)) if v}
            for f in rec["findings"]]


# ------------------------------------------------------------------------------------------------ read-back
def test_malignancy_reader_matches_a_reference_optimiser():
    """The Newton fit minimises the L2-penalised logistic loss: same coefficients as scipy's BFGS on that loss, and
    a separable set is read perfectly."""
    from scipy.optimize import minimize

    from custom.metrics.attribute_classifier import MalignancyReader

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3)) * [1.0, 5.0, 0.1] + [0.0, 2.0, -1.0]
    y = (x[:, 0] + 0.2 * x[:, 1] + rng.normal(scale=0.8, size=60)) > 0.4
    reader = MalignancyReader.fit(x, y, l2=2.0)
    z = (x - x.mean(0)) / x.std(0)

    def loss(w):
        s = z @ w[:3] + w[3]
        return float(np.sum(np.logaddexp(0.0, s) - y * s) + 0.5 * 2.0 * np.sum(w[:3] ** 2))

    ref = minimize(loss, np.zeros(4), method="BFGS", options={"gtol": 1e-10}).x
    assert np.allclose(reader.weights, ref[:3], atol=1e-5) and abs(reader.bias - ref[3]) < 1e-5
    p = reader.probability(x)
    assert np.allclose(p, 1 / (1 + np.exp(-(z @ ref[:3] + ref[3]))), atol=1e-6)
    sep = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]])
    assert MalignancyReader.fit(sep, [False] * 3 + [True] * 3).read(sep) == ["benign"] * 3 + ["malignant"] * 3
    with pytest.raises(ValueError, match="both"):
        MalignancyReader.fit(sep, [True] * 6)


def test_neutral_copy_holds_the_training_median_row(prepared_dir, tmp_path):
    import csv

    from custom.workflows.lesion_label_study import neutral_prepared_copy
    from custom.features import FEATURE_NAMES

    src = Path(prepared_dir)
    rows = list(csv.DictReader(open(src / "features.csv", newline="")))
    train = {e["case_id"] for e in json.loads((src / "datalist.json").read_text())["training"]}
    name = FEATURE_NAMES[5]
    values = sorted(float(r[name]) for r in rows if r["case_id"] in train)
    n = len(values)
    median = values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2  # by hand
    copy = neutral_prepared_copy(src, tmp_path / "neutral", neutral=True, max_cases=1)
    out = list(csv.DictReader(open(copy / "features.csv", newline="")))
    assert len(out) == len(rows) and all(abs(float(r[name]) - median) < 1e-12 for r in out)
    test = json.loads((copy / "datalist.json").read_text())["test"]
    assert len(test) == 1 and test[0]["num_lesions"] > 0 and (copy / "images").is_symlink()
    same = neutral_prepared_copy(src, tmp_path / "own", neutral=False)
    assert list(csv.DictReader(open(same / "features.csv", newline=""))) == rows


def test_lesion_label_study_smoke(label_model, prepared_dir, tmp_path):
    from custom.workflows.lesion_label_study import REQUESTS, fit_reader, model_frame_lesions, run_study

    res = run_study(prepared_dir, label_model, tmp_path / "study", ddim_steps=2, seed=0, max_cases=2)
    lesions = model_frame_lesions(prepared_dir, ("training", "validation", "test"), 32)
    _, ceiling = fit_reader([r for r in lesions if r["split"] == "training"], [r for r in lesions if r["split"] != "training"])
    assert res["reader"]["accuracy"] == ceiling["accuracy"]
    for cond in ("own features", "neutral features"):
        c = res["conditions"][cond]
        assert c["n_lesions"] + len(c["not_read"]) == 2 and set(c["mean_p_malignant"]) == set(REQUESTS)
        assert all(0.0 <= p <= 1.0 for case in c["per_case"].values() for p in case.values())
    sides = [json.loads(p.read_text()) for p in (tmp_path / "study" / "neutral" / "5").glob("*_seed0.json")]
    assert sides and all(s["parameters"]["lesion_labels"][0]["lesion_birads"] == "5" for s in sides)
    assert json.loads((tmp_path / "study" / "lesion_label_study.json").read_text())["settings"]["ddim_steps"] == 2
    reach = res["context_reach"][str(label_model)]
    assert reach["n"] == 2 and reach["features"] >= 0 and reach["context"] >= 0 and reach["eps_mean_abs"] > 0

    # the doc figure from that folder: one row per case, real + 4 generated crops titled with the reader's reading
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_doc_figures import _titles

    from custom.engines.figures import lesion_label_figure

    with _titles() as titles:
        fig = lesion_label_figure(tmp_path / "study", tmp_path / "labels.png", n_cases=1)
    assert fig.is_file()
    case = next(c for c in res["conditions"]["own features"]["per_case"] if c in res["conditions"]["neutral features"]["per_case"])
    p = res["conditions"]["neutral features"]["per_case"][case]["5"]
    assert len(titles) == 5 and titles[0].startswith("real") and titles[-1].endswith(f"P(mal.) {p:.2f}")
    with pytest.raises(ValueError, match="not a lesion-label study"):
        lesion_label_figure(tmp_path, tmp_path / "x.png")


def test_context_reach_hand_made_networks():
    """A network whose noise prediction ignores the context reaches 0; one that adds the mean context token to every
    output reaches exactly |Δ mean token| / mean |eps| (computed by hand here)."""
    from custom.workflows.lesion_label_study import context_reach

    class Fake(torch.nn.Module):
        latent_channels = 1

        def __init__(self, uses_context: bool):
            super().__init__()
            self.uses = uses_context

        def context(self, features, lesion_masks, lesion_present, drop_features=None, drop_mask=None, **_):
            ctx = features.mean(-1, keepdim=True)  # (B, L, 1)
            return torch.where(drop_features.view(-1, 1, 1), torch.zeros_like(ctx), ctx)

        def forward(self, x, t, mask_latent, *args, context=None, **_):
            return x + (context.mean((1, 2)).view(-1, 1, 1, 1) if self.uses else 0.0)

    b = 3
    feats, alt = torch.full((b, 2, 4), 0.5), torch.full((b, 2, 4), 0.2)
    args = (torch.zeros(b, 2, 4, 4), feats, alt, torch.zeros(b, 2, 8, 8), torch.ones(b, 2))
    assert context_reach(Fake(False), *args) == {**context_reach(Fake(False), *args), "features": 0.0, "context": 0.0}
    got = context_reach(Fake(True), *args, seed=3)
    x = torch.randn((b, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    scale = (x + 0.5).abs().mean().item()
    assert abs(got["features"] - 0.3 / scale) < 1e-6 and abs(got["context"] - 0.5 / scale) < 1e-6
    assert abs(got["eps_mean_abs"] - scale) < 1e-6 and got["n"] == b


def test_case_labels_merge_the_findings_and_the_user_lesion_by_lesion(tmp_path):
    """A datalist case's own findings, overridden lesion by lesion by --lesion_labels; findings beyond the model's
    slots are left out (as in training), a user group beyond the case's lesions is refused."""
    from types import SimpleNamespace

    from custom.engines.edit import attach_case_lesion_labels

    findings = [{"lesion_index": i, "category": "Mass", "birads": f"BI-RADS {b}"} for i, b in enumerate((3, 4, 5))]
    (tmp_path / "datalist.json").write_text(json.dumps({"test": [{"case_id": "c1", "findings": findings}]}))

    def cases(n):
        case = SimpleNamespace(name="c1", conditions=SimpleNamespace(num_lesions=n, max_lesions=2), extra={})
        return SimpleNamespace(cases=[case])

    got = attach_case_lesion_labels(cases(3), tmp_path / "datalist.json", ["lesion_birads"], [{}, {"lesion_birads": "2"}])
    case = got.cases[0]
    assert case.extra["lesion_label_codes"].tolist() == [[1], [0]]  # own BI-RADS 3, then the user's 2
    assert case.extra["lesion_labels"] == [{"lesion_birads": "3"}, {"lesion_birads": "2"}]
    msg = _msg(lambda: attach_case_lesion_labels(cases(1), tmp_path, ["lesion_birads"], [{}, {"lesion_birads": "2"}]))
    assert msg.startswith("lesion_labels:") and "the case has 1 lesion" in msg
    assert "trained without lesion labels" in _msg(lambda: attach_case_lesion_labels(cases(1), None, [], [{"lesion_birads": "2"}]))
    untouched = cases(1)
    assert attach_case_lesion_labels(untouched, None, [], None).cases[0].extra == {}
