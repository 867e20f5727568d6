"""Tests for custom.networks: gated fusion, CLIP mask encoder, lesion conditioner, CFG drop events."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from a model hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json
import math

import pytest
import torch

from custom.networks import (
    GatedFusion,
    LesionConditioner,
    MaskCLIPEncoder,
    TokenSources,
    cfg_dropout_masks,
    concat_token_sources,
    zero_dropped,
)

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

# A tiny from-scratch mask encoder for the conditioner tests.
TINY_ENC = dict(image_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=8)


def _tiny_vision_config(**kw):
    from transformers import CLIPVisionConfig

    args = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        patch_size=8, image_size=32, projection_dim=16,
    )
    args.update(kw)
    return CLIPVisionConfig(**args)


@pytest.fixture(scope="module")
def tiny_clip_vision(tmp_path_factory):
    """A random tiny CLIPVisionModel saved with save_pretrained: (folder, model in eval mode)."""
    from transformers import CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPVisionModel(_tiny_vision_config()).eval()
    path = tmp_path_factory.mktemp("clip_vision")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def tiny_clip_full(tmp_path_factory):
    """A random tiny full CLIPModel (text + vision) saved with save_pretrained: (folder, model in eval mode)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(1)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cfg = CLIPConfig(text_config=text, vision_config=_tiny_vision_config().to_dict(), projection_dim=16)
    model = CLIPModel(cfg).eval()
    path = tmp_path_factory.mktemp("clip_full")
    model.save_pretrained(path)
    return path, model


# --------------------------------------------------------------------------------------------- GatedFusion


def _reference_gated(fusion: GatedFusion, rad: torch.Tensor, geo: torch.Tensor):
    """Independent per-sample, per-pair loop implementation of the gated fusion using the module's weights."""
    m, n, k = fusion.m, fusion.n, fusion.top_k
    ks = fusion.kernel_size
    pad = ks // 2

    def lift(x: torch.Tensor, conv: torch.nn.Conv1d, n_out: int) -> torch.Tensor:
        xp = torch.cat([x.new_zeros(pad), x, x.new_zeros(pad)])
        out = x.new_zeros(n_out, x.shape[0])
        for c in range(n_out):
            for t in range(x.shape[0]):
                acc = conv.bias[c].clone()
                for j in range(ks):
                    acc = acc + conv.weight[c, 0, j] * xp[t + j]
                out[c, t] = acc
        return out

    lin1, lin2 = fusion.gate_mlp[0], fusion.gate_mlp[2]
    all_pairs, all_gates, all_scores, all_idx, all_tokens = [], [], [], [], []
    for b in range(rad.shape[0]):
        gc = lift(geo[b], fusion.geometric_lift, m)
        rc = lift(rad[b], fusion.radiomic_lift, n)
        pairs, gates, res, scores = [], [], [], []
        for i in range(m):
            for j in range(n):
                pair = torch.cat([gc[i], rc[j]])
                hidden = torch.relu(lin1.weight @ pair + lin1.bias)
                mlp = torch.sigmoid(lin2.weight @ hidden + lin2.bias)  # (1,)
                gate = pair.mean() * mlp
                r = pair + pair * gate
                pairs.append(pair)
                gates.append(gate)
                res.append(r)
                scores.append(r.mean())
        order = sorted(range(m * n), key=lambda p: -float(scores[p]))[:k]
        mixer = fusion.pair_mixer
        mixed = []
        for c in range(2 * k):
            acc = mixer.bias[c].clone()
            for r_i, p in enumerate(order):
                acc = acc + mixer.weight[c, r_i, 0] * res[p]
            mixed.append(acc)
        fused = torch.stack(mixed).mean(0)
        tokens = (fusion.proj.weight @ fused + fusion.proj.bias).view(fusion.num_tokens, fusion.token_dim)
        all_pairs.append(torch.stack(pairs))
        all_gates.append(torch.stack(gates))
        all_scores.append(torch.stack(scores))
        all_idx.append(torch.tensor(order))
        all_tokens.append(tokens)
    return (torch.stack(all_pairs), torch.stack(all_gates), torch.stack(all_scores), torch.stack(all_idx),
            torch.stack(all_tokens))


@pytest.mark.parametrize("num_tokens", [1, 2])
def test_gated_fusion_matches_loop_reference(num_tokens):
    torch.manual_seed(123)
    fusion = GatedFusion(radiomic_dim=7, geometric_dim=10, m=3, n=2, top_k=4, num_tokens=num_tokens,
                         token_dim=6, hidden_dim=8, mode="gated", kernel_size=5).double()
    rad = torch.rand(3, 7, dtype=torch.float64)
    # per-sample scales and signs so that the ranking of the pairs differs between samples
    geo = torch.randn(3, 10, dtype=torch.float64) * torch.tensor([[1.0], [-4.0], [8.0]], dtype=torch.float64)
    tokens, details = fusion(rad, geo, return_details=True)
    with torch.no_grad():
        pairs, gates, scores, idx, ref_tokens = _reference_gated(fusion, rad, geo)

    assert tokens.shape == (3, num_tokens, 6)
    assert details["pairs"].shape == (3, 6, 17)
    assert details["gates"].shape == (3, 6, 1)
    assert details["scores"].shape == (3, 6)
    assert details["topk_indices"].shape == (3, 4)
    torch.testing.assert_close(details["pairs"], pairs)
    torch.testing.assert_close(details["gates"], gates)
    torch.testing.assert_close(details["scores"], scores)
    assert torch.equal(details["topk_indices"], idx)
    torch.testing.assert_close(tokens, ref_tokens)
    # non-trivial case: the gates vary and the selection is sample-dependent, not simply the first k pairs
    assert details["gates"].std() > 1e-3
    rows = {tuple(r.tolist()) for r in details["topk_indices"]}
    assert len(rows) > 1 and (0, 1, 2, 3) not in rows


def test_gated_fusion_topk_selection_changes_output():
    """Only the selected pairs matter: perturbing the mixer weights of a rank changes the output."""
    torch.manual_seed(5)
    fusion = GatedFusion(radiomic_dim=7, geometric_dim=10, m=3, n=2, top_k=2, token_dim=6).double()
    rad, geo = torch.rand(2, 7, dtype=torch.float64), torch.randn(2, 10, dtype=torch.float64)
    out1 = fusion(rad, geo)
    with torch.no_grad():
        fusion.pair_mixer.weight[:, 1] += 0.5
    assert not torch.allclose(out1, fusion(rad, geo))


@pytest.mark.parametrize("mode", ["gated", "concat", "radiomics", "geometry"])
@pytest.mark.parametrize("num_tokens", [1, 3])
def test_gated_fusion_modes_shapes(mode, num_tokens):
    torch.manual_seed(0)
    fusion = GatedFusion(radiomic_dim=67, geometric_dim=40, m=5, n=5, top_k=5, num_tokens=num_tokens,
                         token_dim=24, mode=mode)
    rad, geo = torch.rand(4, 67), torch.randn(4, 40)
    out = fusion(rad, geo)
    assert out.shape == (4, num_tokens, 24)
    assert torch.isfinite(out).all()


def test_gated_fusion_ablation_modes_ignore_other_input():
    torch.manual_seed(0)
    rad, geo = torch.rand(3, 67), torch.randn(3, 40)
    fr = GatedFusion(geometric_dim=40, token_dim=16, mode="radiomics")
    torch.testing.assert_close(fr(rad, geo), fr(rad, None))
    torch.testing.assert_close(fr(rad, geo), fr(rad, torch.randn(3, 40)))
    assert not torch.allclose(fr(rad, geo), fr(torch.rand(3, 67), geo))
    fg = GatedFusion(geometric_dim=40, token_dim=16, mode="geometry")
    torch.testing.assert_close(fg(rad, geo), fg(None, geo))
    assert not torch.allclose(fg(rad, geo), fg(rad, torch.randn(3, 40)))
    fc = GatedFusion(geometric_dim=40, token_dim=16, num_tokens=2, mode="concat")
    expected = (torch.cat([geo, rad], 1) @ fc.proj.weight.T + fc.proj.bias).view(3, 2, 16)
    torch.testing.assert_close(fc(rad, geo), expected)
    tokens, details = fc(rad, geo, return_details=True)
    assert details == {}


def test_gated_fusion_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        GatedFusion(m=2, n=2, top_k=5)
    GatedFusion(m=2, n=2, top_k=4)  # the boundary is allowed
    with pytest.raises(ValueError, match="mode"):
        GatedFusion(mode="film")
    with pytest.raises(ValueError, match="kernel_size"):
        GatedFusion(kernel_size=4)
    fusion = GatedFusion(radiomic_dim=7, geometric_dim=10, m=2, n=2, top_k=2, token_dim=4)
    with pytest.raises(ValueError, match="radiomic"):
        fusion(torch.rand(2, 8), torch.randn(2, 10))
    with pytest.raises(ValueError, match="batch"):
        fusion(torch.rand(2, 7), torch.randn(3, 10))


# --------------------------------------------------------------------------------------------- CFG drop events


def test_cfg_dropout_masks_frequencies():
    n = 200_000
    g = torch.Generator().manual_seed(42)
    df, dm = cfg_dropout_masks(n, 0.05, 0.05, 0.05, generator=g)
    assert df.shape == (n,) and dm.shape == (n,) and df.dtype == torch.bool and dm.dtype == torch.bool
    freqs = {
        "features_only": (df & ~dm).float().mean().item(),
        "mask_only": (~df & dm).float().mean().item(),
        "both": (df & dm).float().mean().item(),
        "none": (~df & ~dm).float().mean().item(),
    }
    expected = {"features_only": 0.05, "mask_only": 0.05, "both": 0.05, "none": 0.85}
    for key, p in expected.items():
        se = math.sqrt(p * (1 - p) / n)
        assert abs(freqs[key] - p) < 5 * se, (key, freqs[key], p)


def test_cfg_dropout_masks_unequal_probabilities_and_edge_cases():
    n = 200_000
    df, dm = cfg_dropout_masks(n, p_features=0.1, p_mask=0.2, p_both=0.3, generator=torch.Generator().manual_seed(1))
    for got, p in (((df & ~dm), 0.1), ((~df & dm), 0.2), ((df & dm), 0.3)):
        assert abs(got.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    df, dm = cfg_dropout_masks(10_000, 0.0, 0.0, 0.0)
    assert not df.any() and not dm.any()
    df, dm = cfg_dropout_masks(1000, 0.0, 0.0, 1.0)
    assert df.all() and dm.all()
    a = cfg_dropout_masks(64, generator=torch.Generator().manual_seed(7))
    b = cfg_dropout_masks(64, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError):
        cfg_dropout_masks(10, 0.5, 0.4, 0.2)
    with pytest.raises(ValueError):
        cfg_dropout_masks(10, -0.1, 0.0, 0.0)


def test_zero_dropped():
    x = torch.rand(3, 2, 4, 4) + 0.1
    out = zero_dropped(x, torch.tensor([False, True, False]))
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2]) and (out[1] == 0).all()
    assert zero_dropped(x, None) is x


# --------------------------------------------------------------------------------------------- MaskCLIPEncoder


def _expected_pixels(mask: torch.Tensor) -> torch.Tensor:
    return (mask.repeat(1, 3, 1, 1) - CLIP_MEAN) / CLIP_STD


def test_mask_encoder_loads_saved_vision_model(tiny_clip_vision):
    path, saved = tiny_clip_vision
    enc = MaskCLIPEncoder(clip_path=str(path), freeze=True)
    assert enc.output_dim == 32 and enc.image_size == 32
    torch.manual_seed(0)
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float()
    with torch.no_grad():
        expected = saved(pixel_values=_expected_pixels(mask)).pooler_output
        got = enc(mask)
    assert got.shape == (2, 32)
    torch.testing.assert_close(got, expected)
    # other input sizes are resized; the loaded model still works
    assert enc(torch.rand(2, 1, 57, 45)).shape == (2, 32)


def test_mask_encoder_loads_vision_part_of_full_clip(tiny_clip_full):
    path, full = tiny_clip_full
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float()
    pooled = MaskCLIPEncoder(clip_path=path)
    projected = MaskCLIPEncoder(clip_path=path, output="projected")
    assert projected.output_dim == 16
    with torch.no_grad():
        ref_pooled = full.vision_model(pixel_values=_expected_pixels(mask)).pooler_output
        torch.testing.assert_close(pooled(mask), ref_pooled)
        torch.testing.assert_close(projected(mask), full.visual_projection(ref_pooled))


def test_mask_encoder_frozen(tiny_clip_vision):
    path, _ = tiny_clip_vision
    enc = MaskCLIPEncoder(clip_path=path, freeze=True)
    assert sum(p.numel() for p in enc.parameters() if p.requires_grad) == 0
    enc.train()
    assert enc.training and not enc.model.training
    mask = torch.rand(2, 1, 32, 32)
    out = enc(mask)
    assert not out.requires_grad  # no graph back into CLIP

    trainable = MaskCLIPEncoder(clip_path=path, freeze=False).train()
    assert trainable.model.training
    trainable(mask).sum().backward()
    grads = [p.grad for p in trainable.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_mask_encoder_bad_paths(tmp_path):
    missing = tmp_path / "no_such_clip"
    with pytest.raises(FileNotFoundError, match="no_such_clip"):
        MaskCLIPEncoder(clip_path=missing)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_dir"):
        MaskCLIPEncoder(clip_path=empty)
    config_only = tmp_path / "config_only"
    _tiny_vision_config().save_pretrained(config_only)
    with pytest.raises(OSError, match="config_only"):
        MaskCLIPEncoder(clip_path=config_only)
    not_clip = tmp_path / "not_clip"
    not_clip.mkdir()
    (not_clip / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="not_clip"):
        MaskCLIPEncoder(clip_path=not_clip)


def test_mask_encoder_projection_missing_raises(tiny_clip_vision):
    path, _ = tiny_clip_vision  # a bare CLIPVisionModel has no visual_projection
    with pytest.raises(ValueError, match="visual_projection"):
        MaskCLIPEncoder(clip_path=path, output="projected")


def test_mask_encoder_from_scratch_and_other_image_size(tiny_clip_vision):
    torch.manual_seed(0)
    enc = MaskCLIPEncoder(clip_path=None, **TINY_ENC)
    assert enc.output_dim == 32
    assert all(p.requires_grad for p in enc.parameters())
    out = enc(torch.rand(3, 1, 50, 70))
    assert out.shape == (3, 32)
    out.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())

    path, _ = tiny_clip_vision  # a checkpoint used at another resolution (position embeddings interpolated)
    enc48 = MaskCLIPEncoder(clip_path=path, image_size=48)
    assert enc48(torch.rand(2, 1, 64, 64)).shape == (2, 32)
    with pytest.raises(ValueError, match="shape"):
        enc48(torch.rand(2, 3, 64, 64))


# --------------------------------------------------------------------------------------------- LesionConditioner


def _conditioner(mode="gated", **kw) -> LesionConditioner:
    torch.manual_seed(0)
    args = dict(mode=mode, token_dim=16, num_tokens=2, encoder_kwargs=TINY_ENC)
    args.update(kw)
    return LesionConditioner(**args).eval()


def test_conditioner_dropped_features_use_null():
    cond = _conditioner()
    feats = torch.rand(3, 67)
    masks = (torch.rand(3, 1, 40, 40) > 0.5).float()
    drop_f = torch.tensor([True, False, False])
    out = cond(feats, masks, drop_features=drop_f)
    assert out.shape == (3, 2, 16)
    feats2 = feats.clone()
    feats2[0] = torch.rand(67)
    feats2[1] = torch.rand(67)
    out2 = cond(feats2, masks, drop_features=drop_f)
    torch.testing.assert_close(out2[0], out[0])  # dropped: features don't matter
    assert not torch.allclose(out2[1], out[1])  # kept: they do
    torch.testing.assert_close(out2[2], out[2])
    with torch.no_grad():  # exactly the null path: fusion(null_radiomic, CLIP(mask))
        ref = cond.fusion(cond.null_radiomic[None], cond.mask_encoder(masks[:1]))
    torch.testing.assert_close(out[:1], ref)


def test_conditioner_dropped_mask_uses_null():
    cond = _conditioner()
    feats = torch.rand(3, 67)
    masks = (torch.rand(3, 1, 40, 40) > 0.5).float()
    drop_m = torch.tensor([False, True, False])
    out = cond(feats, masks, drop_mask=drop_m)
    masks2 = (torch.rand(3, 1, 40, 40) > 0.5).float()
    out2 = cond(feats, masks2, drop_mask=drop_m)
    torch.testing.assert_close(out2[1], out[1])
    assert not torch.allclose(out2[0], out[0])
    with torch.no_grad():
        ref = cond.fusion(feats[1:2], cond.null_geometric[None])
    torch.testing.assert_close(out[1:2], ref)
    # features still matter for a mask-dropped sample
    feats3 = feats.clone()
    feats3[1] = torch.rand(67)
    assert not torch.allclose(cond(feats3, masks, drop_mask=drop_m)[1], out[1])


def test_conditioner_both_dropped_is_unconditional():
    cond = _conditioner()
    drop = torch.tensor([True, True])
    out = cond(torch.rand(2, 67), torch.rand(2, 1, 32, 32), drop_features=drop, drop_mask=drop)
    uncond = cond.unconditional(2)
    torch.testing.assert_close(out, uncond)
    torch.testing.assert_close(uncond[0], uncond[1])
    # all dropped: no inputs needed, the CLIP encoder is not run
    torch.testing.assert_close(cond(None, None, drop_features=drop, drop_mask=drop), uncond)


def test_conditioner_zero_null():
    cond = _conditioner(null="zero")
    assert not any("null" in name for name, _ in cond.named_parameters())
    feats, masks = torch.rand(2, 67), torch.rand(2, 1, 32, 32)
    drop = torch.tensor([True, False])
    out = cond(feats, masks, drop_features=drop)
    zeroed = feats.clone()
    zeroed[0] = 0
    torch.testing.assert_close(out, cond(zeroed, masks))


def test_conditioner_off_mode():
    cond = _conditioner(mode="off")
    assert cond.mask_encoder is None and cond.fusion is None
    a = cond(torch.rand(3, 67), torch.rand(3, 1, 32, 32))
    b = cond(torch.rand(3, 67), torch.rand(3, 1, 32, 32))
    assert a.shape == (3, 2, 16)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[0], a[2])
    torch.testing.assert_close(cond(None, torch.rand(3, 1, 32, 32)), a)
    assert a.abs().sum() > 0
    cond.train()
    cond(torch.rand(3, 67), None).sum().backward()
    assert cond.off_tokens.grad is not None and cond.off_tokens.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["gated", "concat", "radiomics", "geometry"])
def test_conditioner_modes_and_gradients(mode):
    cond = _conditioner(mode=mode).train()
    feats, masks = torch.rand(4, 67), torch.rand(4, 1, 36, 36)
    drop_f = torch.tensor([True, False, False, False])
    drop_m = torch.tensor([False, True, False, False])
    out = cond(feats if mode != "geometry" else None, masks if mode != "radiomics" else None, drop_f, drop_m)
    assert out.shape == (4, 2, 16)
    out.pow(2).sum().backward()
    for name, p in cond.fusion.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    if mode == "radiomics":
        assert cond.mask_encoder is None and cond.null_geometric is None
    else:  # from-scratch encoder is trainable and gets gradients
        enc_params = list(cond.mask_encoder.parameters())
        assert enc_params and all(p.requires_grad for p in enc_params)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc_params)
    if mode != "geometry":
        assert cond.null_radiomic.grad is not None and cond.null_radiomic.grad.abs().sum() > 0
    if mode != "radiomics":
        assert cond.null_geometric.grad is not None and cond.null_geometric.grad.abs().sum() > 0


def test_conditioner_with_frozen_pretrained_clip(tiny_clip_vision):
    path, saved = tiny_clip_vision
    cond = LesionConditioner(token_dim=16, clip_path=str(path), freeze_clip=True).train()
    assert cond.geometric_dim == 32
    assert not cond.mask_encoder.model.training
    out = cond(torch.rand(2, 67), torch.rand(2, 1, 32, 32))
    out.sum().backward()
    assert all(p.grad is None for p in cond.mask_encoder.parameters())
    assert cond.fusion.proj.weight.grad is not None and cond.fusion.geometric_lift.weight.grad.abs().sum() > 0


def test_conditioner_input_errors():
    cond = _conditioner()
    with pytest.raises(ValueError, match="batch"):
        cond(torch.rand(2, 67), torch.rand(3, 1, 32, 32))
    with pytest.raises(ValueError, match="lesion_mask"):
        cond(torch.rand(2, 67), None)
    with pytest.raises(ValueError, match="features"):
        cond(None, torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="mode"):
        LesionConditioner(mode="film")


# --------------------------------------------------------------------------------------------- token sources


def test_token_sources_concatenation():
    lesion = torch.randn(2, 1, 8)
    clinical = torch.randn(2, 3, 8)
    out = concat_token_sources({"lesion": lesion, "clinical": clinical})
    assert out.shape == (2, 4, 8)
    assert torch.equal(out[:, :1], lesion) and torch.equal(out[:, 1:], clinical)
    ts = TokenSources(["clinical", "lesion"], token_dim=8)
    out2 = ts({"lesion": lesion, "clinical": clinical})
    assert torch.equal(out2[:, :3], clinical) and torch.equal(out2[:, 3:], lesion)
    with pytest.raises(KeyError):
        ts({"lesion": lesion})
    with pytest.raises(ValueError):
        concat_token_sources({"a": lesion, "b": torch.randn(2, 1, 9)})
    with pytest.raises(ValueError):
        TokenSources(["lesion"], token_dim=16)({"lesion": lesion})
