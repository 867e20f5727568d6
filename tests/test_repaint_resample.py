"""RePaint resampling (``keep_resample`` / ``ddim_sample(resample=U)``): the default is today's sampler bit for bit
(checked against a hand-written DDIM + RePaint loop), the re-noising step has the forward-diffusion statistics,
``U > 1`` is honoured (more denoiser calls, different output, known region still kept), bad values are rejected.

Tiny randomly initialised networks on CPU; no timings.
"""

from __future__ import annotations

import pytest
import torch

from custom.engines.sampling import _renoise, ddim_sample, draw_noise, guided_noise
from custom.errors import MammoInputError

from test_sampling_speed import conditions, scheduler, tiny_network


def _repaint_inputs(b: int = 2):
    g = torch.Generator().manual_seed(9)
    region = torch.zeros(b, 1, 8, 8)
    region[..., 2:6, 1:5] = 1.0
    return {"known_latent": torch.randn(b, 4, 8, 8, generator=g), "region": region}


def _reference_loop(net, sch, cond, known, region, steps, guidance, seed):
    """The documented loop (module docstring of custom.engines.sampling), written out by hand: eta = 0."""
    gen = torch.Generator().manual_seed(seed)
    shape = (known.shape[0], 4, 8, 8)
    x = draw_noise(shape, gen, torch.device("cpu"))
    sch.set_timesteps(steps)
    for t in sch.timesteps:
        tb = torch.full((shape[0],), int(t), dtype=torch.long)
        x = region * x + (1 - region) * sch.add_noise(known, draw_noise(shape, gen, torch.device("cpu")), tb)
        eps = guided_noise(net, x, tb, cond, guidance)
        x, _ = sch.step(eps, int(t), x, eta=0.0)
    return region * x + (1 - region) * known


def test_default_resample_is_the_plain_repaint_loop_bit_for_bit():
    net, c, rp = tiny_network(), conditions(2), _repaint_inputs(2)
    with torch.no_grad():
        ref = _reference_loop(net, scheduler(), c, rp["known_latent"], rp["region"], 4, 3.0, 5)
    for kw in ({}, {"resample": 1}):
        out = ddim_sample(net, scheduler(), **c, **rp, num_inference_steps=4, seed=5, progress=False, **kw)
        assert torch.equal(out.latents, ref)


def test_renoise_has_the_forward_diffusion_statistics():
    """x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev) e  ->  x_t ~ sqrt(a_t) x0 + sqrt(1 - a_t) e'."""
    sch = scheduler()
    sch.set_timesteps(20)
    t = 500
    prev = t - 1000 // 20
    a_t, a_prev = sch.alphas_cumprod[t], sch.alphas_cumprod[prev]
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 0.7)
    x_prev = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * torch.randn(x0.shape, generator=g)
    x_t = _renoise(sch, x_prev, t, torch.randn(x0.shape, generator=g))
    assert abs(float(x_t.mean()) - float(a_t.sqrt() * 0.7)) < 5e-3
    assert abs(float(x_t.var()) - float(1 - a_t)) < 5e-3
    # past the last step the scheduler's final alpha is used (1 here: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) n)
    first = int(sch.timesteps[-1])
    n = torch.randn(8, generator=g)
    final = sch.final_alpha_cumprod
    expected = (sch.alphas_cumprod[first] / final).sqrt() * x0[:8] + (1 - sch.alphas_cumprod[first] / final).sqrt() * n
    torch.testing.assert_close(_renoise(sch, x0[:8], first, n), expected)


class _Counting(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0
        self.latent_channels = 4

    def forward(self, *a, **k):
        self.calls += 1
        return self.net(*a, **k)


@pytest.mark.parametrize("resample", [2, 3])
def test_resample_is_honoured_and_keeps_the_known_region(resample):
    c, rp = conditions(2), _repaint_inputs(2)
    plain, more = _Counting(tiny_network()), _Counting(tiny_network())
    a = ddim_sample(plain, scheduler(), **c, **rp, num_inference_steps=4, seed=5, progress=False)
    b = ddim_sample(more, scheduler(), **c, **rp, num_inference_steps=4, seed=5, progress=False, resample=resample)
    assert more.calls == resample * plain.calls == resample * 4
    keep = rp["region"].expand_as(a.latents) == 0
    assert torch.equal(b.latents[keep], rp["known_latent"][keep])  # the kept latent, exactly
    assert not torch.allclose(a.latents[~keep], b.latents[~keep], atol=1e-4)  # the region is resampled
    again = ddim_sample(tiny_network(), scheduler(), **c, **rp, num_inference_steps=4, seed=5, progress=False,
                        resample=resample)
    assert torch.equal(again.latents, b.latents)  # seeded: reproducible


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_resample_is_rejected(bad):
    with pytest.raises(ValueError, match="resample must be an integer >= 1"):
        ddim_sample(tiny_network(), scheduler(), **conditions(1), num_inference_steps=2, progress=False, resample=bad)


def test_keep_resample_option_checks():
    from custom.engines.inference import GCDMSamplingInferer, check_sampling_options

    assert check_sampling_options(20, 3.0, keep_resample="4", mode="remove")["keep_resample"] == 4
    assert check_sampling_options(20, 3.0, keep_resample=1, mode="generate")["keep_resample"] == 1
    for bad in (0, "x", 101):
        with pytest.raises(MammoInputError, match="keep_resample"):
            check_sampling_options(20, 3.0, keep_resample=bad, mode="keep")
    with pytest.raises(MammoInputError, match="keep_resample.*'generate'"):
        check_sampling_options(20, 3.0, keep_resample=2, mode="generate")
    with pytest.raises(MammoInputError, match="keep_resample"):
        GCDMSamplingInferer(scheduler(), torch.nn.Linear(1, 1), resample=0)
