"""FID from the standard FID-Inception weights file: the project's network matches the file's key format
(pytorch-fid's FIDInceptionA/C/E variant of torchvision's Inception3, 1008 classes, no aux head), loads strictly,
resizes like clean-fid, and the Fréchet formula matches hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from custom.errors import MammoInputError
from custom.metrics.frechet import frechet_distance, frechet_distance_from_features
from custom.metrics.inception import FIDInceptionV3, clean_resize, inception_features, load_fid_inception


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def random_file(tmp_path_factory):
    """A randomly initialised network saved as a plain state dict, like pytorch-fid's file (BatchNorm statistics
    perturbed so they matter)."""
    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return net, path


def test_architecture_matches_the_published_inception_v3_and_pytorch_fid_key_names():
    net = FIDInceptionV3()
    # torchvision's inception_v3 has 27,161,264 parameters; its aux head (InceptionAux(768, 1000)) 3,326,696;
    # pytorch-fid's 1008-class fc adds 8 x 2048 + 8.
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696 + 8 * 2048 + 8
    sd = net.state_dict()
    # names as in pytorch-fid's fid_inception_v3() (torchvision module names; FID blocks keep the branch names)
    for key, shape in {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_4a_3x3.bn.running_var": (192,),
                       "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1), "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
                       "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3), "Mixed_7c.branch3x3dbl_3b.bn.weight": (384,),
                       "fc.weight": (1008, 2048), "fc.bias": (1008,)}.items():
        assert tuple(sd[key].shape) == shape, key
    assert not [k for k in sd if k.startswith("AuxLogits")]
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 299, 299)).shape == (1, 2048)


def test_fid_blocks_pool_without_padding_and_the_last_block_max_pools():
    """FIDInceptionA/C/E_1: average pool ignoring padded zeros -> a constant map stays constant at the border;
    E_2 (Mixed_7c) max-pools; checked on the pool branch alone with an identity-like 1x1 conv."""
    from custom.metrics.inception import _avg3

    x = torch.full((1, 2, 5, 5), 3.0)
    assert torch.allclose(_avg3(x), x)  # torchvision's default (count_include_pad=True) gives 3 * 4/9 at corners
    net = FIDInceptionV3()
    assert net.Mixed_7c.max_pool and not net.Mixed_7b.max_pool


def test_the_file_loads_strictly_and_reproduces_the_saved_network(random_file, tmp_path):
    net, path = random_file
    loaded = load_fid_inception(path)
    x = torch.rand(1, 3, 299, 299) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    sd = torch.load(path, weights_only=True)
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # files of old torch versions
    torch.save(old, tmp_path / "old.pth")
    with torch.no_grad():
        assert torch.equal(load_fid_inception(tmp_path / "old.pth")(x), net(x))
    extra = dict(sd, **{"AuxLogits.fc.weight": torch.zeros(1000, 768)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(MammoInputError, match=r"unexpected key\(s\): \['AuxLogits.fc.weight'\]"):
        load_fid_inception(tmp_path / "extra.pth")
    missing = {k: v for k, v in sd.items() if k != "Mixed_6a.branch3x3.conv.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(MammoInputError, match="Mixed_6a.branch3x3.conv.weight"):
        load_fid_inception(tmp_path / "missing.pth")
    with pytest.raises(MammoInputError, match="not found"):
        load_fid_inception(tmp_path / "nope.pth")


def test_clean_resize_quantises_to_8_bits_and_resizes_bicubic_per_channel():
    img = torch.full((1, 1, 32, 32), 0.5)
    out = clean_resize(img)
    assert out.shape == (1, 3, 299, 299) and torch.allclose(out, torch.full_like(out, 128.0))  # round(127.5) = 128
    ramp = torch.linspace(0, 1, 64).view(1, 1, 1, 64).repeat(1, 1, 64, 1)
    r = clean_resize(ramp)[0, 0].numpy()
    assert np.allclose(r, r[0:1], atol=1e-3)  # rows identical (no vertical structure)
    mid = r[0, 20:280]
    assert np.all(np.diff(mid) > 0) and r.min() >= 0 and r.max() <= 255  # monotone inside, clipped to [0, 255]


def test_frechet_formula_against_hand_computed_cases():
    # 1-D: features {0, 2} and {1, 3}: means 1 and 2, unbiased variances 2 and 2 -> 1 + 2 + 2 - 2 * 2 = 1
    assert frechet_distance_from_features(np.array([[0.0], [2.0]]), np.array([[1.0], [3.0]])) == pytest.approx(1.0)
    # 2-D diagonal: S1 = diag(1, 4), S2 = diag(4, 1): tr sqrt(S1 S2) = 2 + 2; ||mu1 - mu2||^2 = 9 + 16
    d = frechet_distance([0, 0], np.diag([1.0, 4.0]), [3, 4], np.diag([4.0, 1.0]))
    assert d == pytest.approx(25 + 5 + 5 - 2 * 4)


def test_feature_distance_uses_the_inception_file_and_records_its_sha256(random_file):
    import hashlib

    from custom.metrics.fid import FeatureDistance

    _net, path = random_file
    fd = FeatureDistance(feature_network=str(path))
    g = torch.Generator().manual_seed(1)
    real, gen = torch.rand(2, 1, 32, 32, generator=g), torch.rand(2, 1, 32, 32, generator=g) * 0.5
    out = fd(real, gen)
    assert out["fid_feature_network_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert out["fid_feature_dim"] == 2048 and out["fid"] > 0 and "FID Inception" in out["fid_feature_network"]
    # by hand: the features are the network on the clean-resized image scaled to [-1, 1]
    with torch.no_grad():
        fr = fd.network(clean_resize(real) / 255.0 * 2 - 1).double().numpy()
        fg = fd.network(clean_resize(gen) / 255.0 * 2 - 1).double().numpy()
    assert np.allclose(inception_features(fd.network, real), fr)
    # two samples per set: rank-1 covariances u u^T, w w^T (u = (f0 - f1) / sqrt 2), so tr sqrt(S1 S2) = |u . w|
    u, w = (fr[0] - fr[1]) / np.sqrt(2), (fg[0] - fg[1]) / np.sqrt(2)
    expected = np.sum((fr.mean(0) - fg.mean(0)) ** 2) + u @ u + w @ w - 2 * abs(u @ w)
    assert out["fid"] == pytest.approx(expected, rel=1e-3)
