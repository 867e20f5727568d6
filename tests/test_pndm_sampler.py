"""The sampler choice (``sampler: "ddim" | "pndm"``): MONAI's PNDM path against a hand-written loop over
``PNDMScheduler.step``, per-row seeds, the DDIM default unchanged, and the option checks.

Tiny randomly initialised networks on CPU, one thread (helpers from ``test_sampling_speed``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.schedulers import DDIMScheduler, PNDMScheduler

from custom.engines.inference import GCDMSamplingInferer, check_sampler
from custom.engines.sampling import SAMPLERS, ddim_sample, pndm_sample
from custom.errors import MammoInputError
from test_sampling_speed import _StubEncoder, conditions, scheduler, tiny_network

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def pndm() -> PNDMScheduler:
    return PNDMScheduler(1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195,
                         prediction_type="v_prediction", skip_prk_steps=True, set_alpha_to_one=True)


def hand_pndm(net, c, seeds, steps, s):
    """The expectation, written out: per-row noise from ``torch.Generator().manual_seed(seed)``, CFG as two separate
    forwards (conditional; features and mask dropped), MONAI's ``PNDMScheduler.step`` in its own timestep order."""
    sch = pndm()
    sch.set_timesteps(steps)
    x = torch.cat([torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(sd)) for sd in seeds])
    b = x.shape[0]
    on, off = torch.ones(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)
    for t in sch.timesteps:
        tb = torch.full((b,), int(t), dtype=torch.long)
        cond = net(x, tb, **c, drop_features=off, drop_mask=off)
        uncond = net(x, tb, **c, drop_features=on, drop_mask=on)
        x, _ = sch.step(uncond + s * (cond - uncond), int(t), x)
    return x


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_pndm_sample_equals_hand_written_monai_loop(guidance):
    net = tiny_network()
    c = conditions(3)
    seeds = [5, 6, 7]
    with torch.no_grad():
        expected = hand_pndm(net, c, seeds, 6, guidance)
    out = pndm_sample(net, pndm(), **c, num_inference_steps=6, guidance_scale=guidance, seed=seeds, progress=False)
    torch.testing.assert_close(out.latents, expected, atol=1e-5, rtol=1e-5)
    # not DDIM under another name: the same network, noise and steps give another result
    ddim = ddim_sample(net, scheduler(), **c, num_inference_steps=6, guidance_scale=guidance, seed=seeds, eta=0.0,
                       progress=False)
    assert not torch.allclose(out.latents, ddim.latents, atol=1e-3)
    # the scheduler's state is reset per run: a second run on the same scheduler object gives the same result
    sch = pndm()
    a = pndm_sample(net, sch, **c, num_inference_steps=6, guidance_scale=guidance, seed=seeds, progress=False)
    b = pndm_sample(net, sch, **c, num_inference_steps=6, guidance_scale=guidance, seed=seeds, progress=False)
    torch.testing.assert_close(a.latents, b.latents)


def test_pndm_rows_do_not_depend_on_the_batch():
    net = tiny_network()
    c = conditions(4)
    seeds = [11, 12, 13, 11]
    batched = pndm_sample(net, pndm(), **c, num_inference_steps=4, seed=seeds, progress=False)
    for i, s in enumerate(seeds):
        one = pndm_sample(net, pndm(), **{k: v[i : i + 1] for k, v in c.items()}, num_inference_steps=4, seed=s,
                          progress=False)
        torch.testing.assert_close(batched.latents[i : i + 1], one.latents, atol=1e-5, rtol=1e-5)


def test_pndm_sample_needs_a_pndm_scheduler():
    with pytest.raises(TypeError, match="PNDMScheduler"):
        pndm_sample(tiny_network(), scheduler(), **conditions(1), num_inference_steps=2, progress=False)


def test_inferer_default_is_the_unchanged_ddim_path():
    """``GCDMSamplingInferer`` without ``sampler`` is DDIM with eta: the images of a direct ``ddim_sample`` call."""
    net = tiny_network()
    label = torch.ones(2, 1, 32, 32)
    enc = _StubEncoder()
    inferer = GCDMSamplingInferer(scheduler(), enc, num_inference_steps=3, guidance_scale=3.0, eta=1.0, progress=False)
    assert inferer.sampler == "ddim" and inferer.eta == 1.0
    got = inferer(label, net, seeds=[1, 2])
    from custom.transforms.masks import soft_mask

    mask_latent = enc.encode_mask(soft_mask(label, sigma=1.5))
    ref = ddim_sample(net, scheduler(), mask_latent, torch.zeros(2, 2, 67), torch.zeros(2, 2, 32, 32), torch.zeros(2, 2),
                      num_inference_steps=3, guidance_scale=3.0, seed=[1, 2], eta=1.0, decoder=enc, progress=False)
    torch.testing.assert_close(got, ref.images.clamp(0, 1))


def test_inferer_pndm_path_and_its_checks():
    net = tiny_network()
    label = torch.ones(2, 1, 32, 32)
    enc = _StubEncoder()
    inferer = GCDMSamplingInferer(pndm(), enc, num_inference_steps=3, eta=None, progress=False, sampler="pndm")
    got = inferer(label, net, seeds=[1, 2])
    from custom.transforms.masks import soft_mask

    mask_latent = enc.encode_mask(soft_mask(label, sigma=1.5))
    ref = pndm_sample(net, pndm(), mask_latent, torch.zeros(2, 2, 67), torch.zeros(2, 2, 32, 32), torch.zeros(2, 2),
                      num_inference_steps=3, guidance_scale=3.0, seed=[1, 2], decoder=enc, progress=False)
    torch.testing.assert_close(got, ref.images.clamp(0, 1))
    with pytest.raises(MammoInputError, match="ddim_eta"):
        GCDMSamplingInferer(pndm(), enc, eta=0.5, sampler="pndm")
    with pytest.raises(ValueError, match="needs a PNDMScheduler"):
        GCDMSamplingInferer(scheduler(), enc, eta=None, sampler="pndm")
    with pytest.raises(MammoInputError, match="sampler"):
        GCDMSamplingInferer(scheduler(), enc, sampler="euler")
    with pytest.raises(MammoInputError, match="keep mode"):
        inferer(label, net, seeds=[1, 2], known_image=torch.rand(2, 1, 32, 32), region=torch.ones(2, 1, 32, 32))


def test_check_sampler_rejects_what_pndm_cannot_honour():
    assert SAMPLERS == ("ddim", "pndm")
    assert check_sampler("ddim", 0.3, "keep") == "ddim"
    assert check_sampler("PNDM", None) == "pndm"
    assert check_sampler("pndm", 1.0, "generate", default_eta=1.0) == "pndm"  # the untouched config default
    with pytest.raises(MammoInputError, match="^ddim_eta: PNDM has no eta"):
        check_sampler("pndm", 0.0, default_eta=1.0)
    with pytest.raises(MammoInputError, match="^ddim_eta"):
        check_sampler("pndm", 1.0)  # evaluate.json: any given eta is a request
    for mode in ("keep", "inpaint", "remove"):
        with pytest.raises(MammoInputError, match="^mode: --sampler pndm generates whole images only"):
            check_sampler("pndm", None, mode)
    with pytest.raises(MammoInputError, match="^sampler: must be one of ddim, pndm"):
        check_sampler("dpm")


def test_configs_default_to_ddim_and_pndm_scheduler_has_the_training_schedule():
    for name in ("inference.json", "evaluate.json"):
        assert json.loads((CONFIGS / name).read_text())["sampler"] == "ddim", name
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "common.json"))
    ddim = parser.get_parsed_content("sampling_scheduler", instantiate=True)
    train = parser.get_parsed_content("scheduler", instantiate=True)
    p = parser.get_parsed_content("pndm_scheduler", instantiate=True)
    assert isinstance(ddim, DDIMScheduler) and isinstance(p, PNDMScheduler)
    assert p.prediction_type == train.prediction_type == parser["prediction_type"] and p.skip_prk_steps
    torch.testing.assert_close(p.alphas_cumprod, train.alphas_cumprod)
    assert float(p.final_alpha_cumprod) == float(ddim.final_alpha_cumprod) == 1.0
