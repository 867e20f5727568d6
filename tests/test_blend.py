"""Poisson blending of a regenerated region (custom.transforms.blend), against hand-solved systems and the
invariants of the discrete Poisson equation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from custom.errors import MammoInputError
from custom.transforms.blend import harmonic_offset, poisson_blend


def _laplacian(a: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    return 4 * a[ys, xs] - a[ys - 1, xs] - a[ys + 1, xs] - a[ys, xs - 1] - a[ys, xs + 1]


def _texture(shape: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, shape)


def test_one_pixel_region_is_the_mean_of_its_four_neighbours():
    b = np.zeros((5, 5))
    b[1, 2], b[3, 2], b[2, 1], b[2, 3] = 1.0, 2.0, 3.0, 6.0
    region = np.zeros((5, 5), bool)
    region[2, 2] = True
    h = harmonic_offset(b, region)
    assert h[2, 2] == pytest.approx(3.0)  # (1 + 2 + 3 + 6) / 4
    assert not h[~region].any()


def test_two_pixel_region_solves_the_hand_written_system():
    # p1 = (2, 2), p2 = (2, 3): 4 h1 - h2 = s1, 4 h2 - h1 = s2, with s the sums of the outside neighbours
    rng = np.random.default_rng(0)
    b = rng.normal(size=(6, 6))
    region = np.zeros((6, 6), bool)
    region[2, 2:4] = True
    s1 = b[1, 2] + b[3, 2] + b[2, 1]
    s2 = b[1, 3] + b[3, 3] + b[2, 4]
    h = harmonic_offset(b, region)
    assert h[2, 2] == pytest.approx((4 * s1 + s2) / 15)
    assert h[2, 3] == pytest.approx((4 * s2 + s1) / 15)


def test_a_region_on_the_image_border_reflects():
    # corner pixel (0, 0): only two neighbours inside the image, so h = their mean
    b = np.zeros((4, 4))
    b[0, 1], b[1, 0] = 2.0, 5.0
    region = np.zeros((4, 4), bool)
    region[0, 0] = True
    assert harmonic_offset(b, region)[0, 0] == pytest.approx(3.5)


@pytest.mark.parametrize("offset", ["constant", "linear"])
def test_an_offset_the_laplacian_cannot_see_is_removed_exactly(offset):
    """known = generated + a harmonic field (constant, or linear away from the border): blending gives known back
    everywhere, i.e. the generated texture with the source's brightness."""
    gen = _texture((32, 32), 1)
    yy, xx = np.mgrid[0:32, 0:32].astype(float)
    field = np.full_like(gen, 0.3) if offset == "constant" else 0.01 * yy - 0.02 * xx + 0.1
    known = gen + field
    region = np.zeros((32, 32), bool)
    region[8:20, 10:25] = True
    region[20:24, 12:15] = True  # not a rectangle
    out = poisson_blend(gen, known, region).numpy()
    np.testing.assert_allclose(out, known.astype(np.float32), atol=1e-6)


def test_texture_is_kept_and_the_outside_is_the_source_bit_for_bit():
    gen = _texture((40, 40), 2).astype(np.float32)
    known = (0.5 * _texture((40, 40), 3) + 0.4).astype(np.float32)
    region = np.zeros((40, 40), bool)
    yy, xx = np.mgrid[0:40, 0:40]
    region[(yy - 20) ** 2 + (xx - 18) ** 2 <= 81] = True
    out = poisson_blend(torch.from_numpy(gen), torch.from_numpy(known), torch.from_numpy(region)).numpy()
    assert np.array_equal(out[~region], known[~region])
    ys, xs = np.nonzero(region)  # every region pixel (none on the image border): the Laplacian is the generated one's
    np.testing.assert_allclose(_laplacian(out.astype(np.float64), ys, xs), _laplacian(gen.astype(np.float64), ys, xs),
                               atol=2e-5)
    # the offset obeys the maximum principle: within the range of known - generated on the boundary ring
    from scipy import ndimage

    ring = ndimage.binary_dilation(region) & ~region
    h = out.astype(np.float64)[region] - gen.astype(np.float64)[region]
    d = (known.astype(np.float64) - gen)[ring]
    assert d.min() - 1e-6 <= h.min() and h.max() <= d.max() + 1e-6


def test_a_region_without_boundary_is_left_as_generated_and_batches_are_per_row():
    gen = torch.rand(2, 1, 16, 16)
    known = gen + 0.25
    region = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    region[0] = True  # the whole image: nothing to take a brightness from
    region[1, 0, 4:9, 4:9] = True
    out = poisson_blend(gen, known, region)
    assert torch.equal(out[0], gen[0])
    np.testing.assert_allclose(out[1].numpy(), known[1].numpy(), atol=1e-6)
    assert out.dtype == torch.float32 and out.shape == gen.shape
    with pytest.raises(ValueError, match="differ"):
        poisson_blend(gen, known[:1], region)


def test_the_inferer_pastes_with_the_blend_and_checks_the_option():
    from monai.networks.schedulers import DDIMScheduler

    from custom.engines.inference import GCDMSamplingInferer, check_blend, check_sampling_options

    enc = torch.nn.Linear(1, 1)
    img = torch.rand(1, 1, 24, 24) * 0.5
    known = img + 0.3
    region = torch.zeros(1, 1, 24, 24)
    region[..., 6:16, 8:18] = 1
    feather = GCDMSamplingInferer(DDIMScheduler(1000), enc, feather=2, progress=False, blend="feather")
    poisson = GCDMSamplingInferer(DDIMScheduler(1000), enc, feather=2, progress=False)  # the default
    a, b = feather.paste(img, known, region), poisson.paste(img, known, region)
    out = region[0, 0] == 0
    assert torch.equal(a[0, 0][out], known[0, 0][out]) and torch.equal(b[0, 0][out], known[0, 0][out])
    assert (a - known).abs().max() > 0.29  # the feathered paste keeps the generated brightness
    assert (b - known).abs().max() < 1e-5  # Poisson blending takes the surroundings' brightness
    assert poisson.blend == "poisson" and check_blend(None) == "poisson" and check_blend(" Feather ") == "feather"
    for bad in ("laplace", "", 1):
        with pytest.raises(MammoInputError, match="keep_blend: must be one of feather, poisson"):
            check_blend(bad)
    assert check_sampling_options(20, 3.0, keep_blend="poisson", mode="remove")["keep_blend"] == "poisson"
    assert "keep_blend" not in check_sampling_options(20, 3.0, mode="generate")  # not given: the default
    for value in ("poisson", "feather"):
        with pytest.raises(MammoInputError, match="keep_blend.*'generate'"):
            check_sampling_options(20, 3.0, keep_blend=value, mode="generate")
