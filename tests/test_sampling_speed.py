"""Speed changes of sampling that claim the same output, each checked against the slower reference path:

- SDPA attention (MONAI ``use_flash_attention=True``) vs MONAI's einsum attention, same weights;
- the lesion context computed once per sampling run vs once per DDIM step (and the conditioner really runs once);
- all rows of a request in one sampler call with per-row seeds vs one call per row (``ddim_sample`` and the
  inference ``GCDMSamplingInferer``), with ``eta`` noise and RePaint noise too.

Tiny randomly initialised networks on CPU, one thread; no timings.
"""

from __future__ import annotations

import pytest
import torch

from custom.engines.sampling import ddim_sample, draw_noise, row_generators


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _perturb(net: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """MONAI zero-initialises the UNet's output conv; random weights make outputs depend on the inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for q in net.parameters():
            q.add_(torch.randn(q.shape, generator=g) * std)
    return net


def tiny_network(use_flash_attention: bool = False, token_sources=None):
    from custom.networks.gcdm import GCDMNetwork

    torch.manual_seed(0)
    net = GCDMNetwork(
        latent_channels=4, mask_latent_channels=12,
        conditioner={"mode": "gated", "token_dim": 16, "encoder_kwargs": {
            "image_size": 16, "patch_size": 8, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32, "output": "pooled"}},
        unet_kwargs={"channels": [8, 16, 16], "attention_levels": [False, True, True], "num_res_blocks": 1,
                     "num_head_channels": 8, "norm_num_groups": 8, "use_flash_attention": use_flash_attention},
        token_sources=token_sources,
    )
    return _perturb(net).eval()


def conditions(b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        "mask_latent": torch.randn(b, 12, 8, 8, generator=g),
        "features": torch.rand(b, 2, 67, generator=g),
        "lesion_masks": (torch.rand(b, 2, 32, 32, generator=g) > 0.7).float(),
        "lesion_present": torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]][:b]),
    }


def scheduler(prediction_type: str = "v_prediction"):
    from monai.networks.schedulers import DDIMScheduler

    return DDIMScheduler(1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195,
                         prediction_type=prediction_type, clip_sample=False)


# ------------------------------------------------------------------------------------------ SDPA vs einsum
@pytest.mark.parametrize("heads", [8, 4])
def test_sdpa_attention_equals_einsum(heads):
    """MONAI's ``use_flash_attention`` (torch SDPA) computes the same attention as its einsum path: same state dict
    keys, same outputs within float tolerance, self- and cross-attention, several heads."""
    from monai.networks.nets import DiffusionModelUNet

    kw = dict(spatial_dims=2, in_channels=3, out_channels=3, channels=[8, 16], attention_levels=[True, True],
              num_res_blocks=1, num_head_channels=heads, norm_num_groups=8, with_conditioning=True,
              cross_attention_dim=12)
    torch.manual_seed(1)
    ref = _perturb(DiffusionModelUNet(**kw, use_flash_attention=False)).eval()
    fast = DiffusionModelUNet(**kw, use_flash_attention=True).eval()
    assert set(ref.state_dict()) == set(fast.state_dict())
    fast.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 5, 12, generator=g)
    t = torch.tensor([5, 500, 999])
    with torch.no_grad():
        a, b = ref(x, t, context=ctx), fast(x, t, context=ctx)
    assert a.abs().mean() > 1e-3  # a real signal, not zeros
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_gcdm_network_sdpa_sampling_equals_einsum():
    ref, fast = tiny_network(False), tiny_network(True)
    fast.load_state_dict(ref.state_dict())
    c = conditions(2)
    a = ddim_sample(ref, scheduler(), **c, num_inference_steps=3, seed=[3, 4], progress=False)
    b = ddim_sample(fast, scheduler(), **c, num_inference_steps=3, seed=[3, 4], progress=False)
    torch.testing.assert_close(b.latents, a.latents, atol=1e-4, rtol=1e-4)


def test_configs_default_to_sdpa():
    """SDPA is the default of the shipped configs (it gives the same output, see above)."""
    from monai.bundle import ConfigParser

    from conftest import BUNDLE

    for files in (["common.json", "train_diffusion.json"], ["common.json", "train_diffusion.json", "paper.json"]):
        p = ConfigParser()
        p.read_config([str(BUNDLE / "configs" / f) for f in files])
        assert p.get_parsed_content("use_flash_attention") is True, files


# ------------------------------------------------------------------------------------- context once vs per step
@pytest.mark.parametrize("guidance, eta", [(3.0, 0.0), (1.0, 0.0), (2.0, 1.0)])
def test_context_once_equals_per_step(guidance, eta):
    net = tiny_network()
    c = conditions(3)
    once = ddim_sample(net, scheduler(), **c, num_inference_steps=4, guidance_scale=guidance, eta=eta, seed=7,
                       progress=False, context_once=True)
    each = ddim_sample(net, scheduler(), **c, num_inference_steps=4, guidance_scale=guidance, eta=eta, seed=7,
                       progress=False, context_once=False)
    torch.testing.assert_close(once.latents, each.latents, atol=1e-5, rtol=1e-5)


def test_conditioner_runs_once_per_sampling_run():
    net = tiny_network()
    calls = []
    hook = net.conditioner.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    try:
        ddim_sample(net, scheduler(), **conditions(2), num_inference_steps=5, guidance_scale=3.0, seed=0, progress=False)
        assert calls == [2 * 2 * 2]  # one run: 2 rows x (cond + uncond) x 2 lesion slots
        calls.clear()
        ddim_sample(net, scheduler(), **conditions(2), num_inference_steps=5, guidance_scale=3.0, seed=0, progress=False,
                    context_once=False)
        assert len(calls) == 5
    finally:
        hook.remove()


def test_precomputed_context_equals_forward_and_is_checked():
    net = tiny_network()
    c = conditions(2)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    drop = torch.tensor([False, True])
    with torch.no_grad():
        ctx = net.context(c["features"], c["lesion_masks"], c["lesion_present"], drop, drop)
        torch.testing.assert_close(net(x, t, **c, drop_features=drop, drop_mask=drop, context=ctx),
                                   net(x, t, **c, drop_features=drop, drop_mask=drop))
        with pytest.raises(ValueError, match="context must be"):
            net(x, t, **c, context=ctx[:1])


def test_context_once_with_an_extra_token_source():
    class Clinical(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 16)

        def forward(self, v):
            return self.lin(v)[:, None]

    net = tiny_network(token_sources={"clinical": Clinical()})
    c = {**conditions(2), "clinical": torch.randn(2, 3)}
    a = ddim_sample(net, scheduler(), **c, num_inference_steps=3, seed=1, progress=False)
    b = ddim_sample(net, scheduler(), **c, num_inference_steps=3, seed=1, progress=False, context_once=False)
    torch.testing.assert_close(a.latents, b.latents, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ batched vs row by row
def test_draw_noise_per_row_generators():
    noise = draw_noise((3, 2, 4, 4), row_generators([5, 6, 5]), torch.device("cpu"))
    torch.testing.assert_close(noise[0], torch.randn((1, 2, 4, 4), generator=torch.Generator().manual_seed(5))[0])
    torch.testing.assert_close(noise[0], noise[2])
    assert not torch.allclose(noise[0], noise[1])
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        draw_noise((3, 2), row_generators([1, 2]), torch.device("cpu"))


@pytest.mark.parametrize("eta, repaint", [(0.0, False), (1.0, False), (0.0, True)])
def test_batched_rows_equal_row_by_row(eta, repaint):
    net = tiny_network()
    c = conditions(4)
    seeds = [11, 12, 13, 11]
    extra = {}
    if repaint:
        g = torch.Generator().manual_seed(9)
        region = torch.zeros(4, 1, 8, 8)
        region[..., 2:6, 1:5] = 1.0
        extra = {"known_latent": torch.randn(4, 4, 8, 8, generator=g), "region": region}
    batched = ddim_sample(net, scheduler(), **c, **extra, num_inference_steps=4, eta=eta, seed=seeds, progress=False)
    for i, s in enumerate(seeds):
        one = ddim_sample(net, scheduler(), **{k: v[i : i + 1] for k, v in {**c, **extra}.items()},
                          num_inference_steps=4, eta=eta, seed=s, progress=False)
        torch.testing.assert_close(batched.latents[i : i + 1], one.latents, atol=1e-5, rtol=1e-5)
    # rows 0 and 3 share a seed but not their conditions: different images
    assert not torch.allclose(batched.latents[0], batched.latents[3], atol=1e-3)


class _StubEncoder(torch.nn.Module):
    """Deterministic stand-in for the stage-1 encoder: soft mask (B, 3, 32, 32) -> (B, 12, 8, 8) latents,
    latents -> images in [0, 1]."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def encode_mask(self, soft):
        return torch.nn.functional.avg_pool2d(soft, 4).repeat_interleave(4, dim=1)

    def encode(self, image):
        return torch.nn.functional.avg_pool2d(image, 4).repeat(1, 4, 1, 1)

    def decode(self, z):
        return torch.sigmoid(torch.nn.functional.interpolate(z[:, :1], scale_factor=4))


def test_inferer_batches_rows_like_row_by_row():
    from custom.engines.inference import GCDMSamplingInferer

    net = tiny_network()
    label = torch.ones(3, 1, 32, 32)
    label[:, :, :, :4] = 0
    label[0, 0, 4:9, 10:15] = 2
    label[2, 0, 20:26, 8:12] = 2
    feats = torch.rand(3, 2, 67, generator=torch.Generator().manual_seed(3))
    inferer = GCDMSamplingInferer(scheduler(), _StubEncoder(), num_inference_steps=3, guidance_scale=3.0, eta=1.0,
                                  progress=False)
    calls = []
    hook = net.conditioner.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    try:
        batched = inferer(label, net, features=feats, seeds=[4, 5, 6])
    finally:
        hook.remove()
    assert calls == [3 * 2 * 2]  # one sampler call for the 3 rows
    for i, s in enumerate([4, 5, 6]):
        one = inferer(label[i : i + 1], net, features=feats[i : i + 1], seeds=[s])
        torch.testing.assert_close(batched[i : i + 1], one, atol=1e-5, rtol=1e-5)


def test_inferer_compile_switch_samples_through_torch_compile(monkeypatch):
    """``compile=True`` routes every denoiser call through ``torch.compile`` (here a recording stand-in: compiling
    for real takes minutes on CPU; ``make bench --compile`` measures it) and gives the eager images."""
    from custom.engines.inference import GCDMSamplingInferer

    compiled_calls = []

    def fake_compile(fn, **kwargs):
        assert kwargs == {"dynamic": False}

        def wrapped(*a, **k):
            compiled_calls.append(1)
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(torch, "compile", fake_compile)
    net = tiny_network()
    label = torch.ones(2, 1, 32, 32)
    eager = GCDMSamplingInferer(scheduler(), _StubEncoder(), num_inference_steps=3, progress=False)(label, net, seeds=[1, 2])
    inferer = GCDMSamplingInferer(scheduler(), _StubEncoder(), num_inference_steps=3, progress=False, compile=True)
    out = inferer(label, net, seeds=[1, 2])
    assert len(compiled_calls) == 3  # one CFG forward per step
    torch.testing.assert_close(out, eager)
    inferer(label, net, seeds=[1, 2])
    assert len(compiled_calls) == 6 and inferer._compiled[0] is net  # compiled once, reused
