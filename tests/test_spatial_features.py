"""``spatial_feature_channels``: the lesion features as UNet input channels over each lesion (0.9.2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from custom.networks.gcdm import GCDMNetwork

torch.set_num_threads(1)


def _net(k: int) -> GCDMNetwork:
    return GCDMNetwork(
        latent_channels=2, mask_latent_channels=0, max_lesions=2,
        conditioner={"mode": "radiomics", "radiomic_dim": 67, "token_dim": 16, "num_tokens": 2, "hidden_dim": 16},
        unet_kwargs={"channels": [8, 8], "attention_levels": [False, True], "num_res_blocks": 1, "num_head_channels": 8,
                     "norm_num_groups": 4},
        spatial_feature_channels=k,
    )


def test_default_builds_nothing_and_keeps_the_input_width():
    net = _net(0)
    assert net.feature_map is None and net.unet.in_channels == 2 and net.spatial_feature_channels == 0
    assert not any(name.startswith("feature_map") for name in net.state_dict())


def test_feature_channels_by_hand_and_the_unet_sees_them():
    """K = 2 with hand-set weights: slot s contributes (W f_s + b) times its area-pooled mask, summed over slots;
    0 for an empty slot and for a sample whose features are dropped; the UNet input is exactly [x, those channels]."""
    torch.manual_seed(0)
    net = _net(2).eval()
    assert net.unet.in_channels == 4
    with torch.no_grad():
        net.feature_map.weight.zero_()
        net.feature_map.bias.copy_(torch.tensor([0.5, -1.0]))
        net.feature_map.weight[0, 3] = 2.0   # channel 0 = 2 f_3 + 0.5
        net.feature_map.weight[1, 10] = -1.0  # channel 1 = -f_10 - 1
    feats = torch.zeros(2, 2, 67)
    feats[0, 0, 3], feats[0, 1, 3], feats[0, 1, 10], feats[1, 0, 10] = 1.0, -1.0, 2.0, 4.0
    masks = torch.zeros(2, 2, 8, 8)
    masks[0, 0, 0:4, 0:4] = 1   # one latent cell (4x4 latent)
    masks[0, 1, 2:6, 2:6] = 1   # overlaps it by a quarter
    masks[1, 0, 4:8, 0:2] = 1   # half of two cells
    masks[1, 1, 0:2, 0:2] = 1   # an empty slot's mask is ignored
    present = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    a = torch.nn.functional.adaptive_avg_pool2d(masks, (4, 4))
    want = torch.zeros(2, 2, 4, 4)
    want[0, 0] = a[0, 0] * (2 * 1.0 + 0.5) + a[0, 1] * (2 * -1.0 + 0.5)
    want[0, 1] = a[0, 0] * (-0.0 - 1.0) + a[0, 1] * (-2.0 - 1.0)
    want[1, 0] = a[1, 0] * 0.5
    want[1, 1] = a[1, 0] * (-4.0 - 1.0)
    got = net.feature_channels(feats, masks, present, (4, 4))
    assert torch.allclose(got, want, atol=1e-6)
    drop = torch.tensor([False, True])
    dropped = net.feature_channels(feats, masks, present, (4, 4), drop)
    assert torch.allclose(dropped[0], want[0]) and (dropped[1] == 0).all()
    x, t = torch.randn(2, 2, 4, 4), torch.tensor([5, 500])
    with torch.no_grad():  # random non-zero weights (MONAI zero-initialises the output convolution)
        for param in net.unet.parameters():
            param.add_(torch.randn_like(param) * 0.2)
        ctx = net.context(feats, masks, present)
        out = net(x, t, None, feats, masks, present, context=ctx)
        ref = net.unet(torch.cat([x, want], 1), t, context=ctx)
        # with the context precomputed, the channels still follow the features given to forward
        moved = feats.clone()
        moved[0, 0, 3] = 3.0
        other = net(x, t, None, moved, masks, present, context=ctx)
    assert torch.allclose(out, ref, atol=1e-5)
    assert not torch.allclose(out[0], other[0]) and torch.allclose(out[1], other[1])


@pytest.mark.parametrize("bad", [-1, 1.5, True, float("nan"), float("inf"), "4"])
def test_bad_channel_counts_are_refused(bad):
    from custom.networks.gcdm import check_spatial_feature_channels
    from custom.errors import MammoInputError

    with pytest.raises(ValueError, match="spatial_feature_channels"):
        _net(bad)
    with pytest.raises(MammoInputError, match="spatial_feature_channels: must be an integer >= 0"):
        check_spatial_feature_channels(bad)
    assert check_spatial_feature_channels(4) == 4 and check_spatial_feature_channels(4.0) == 4


def test_the_option_is_recorded_with_the_model():
    """A model trained with K > 0 must be rebuilt with K > 0: the key is in common.json's diffusion_record (written
    into model.pt and read back by BundleModel) and passed to the network definition."""
    common = json.loads((Path(__file__).resolve().parents[1] / "bundle" / "configs" / "common.json").read_text())
    assert common["spatial_feature_channels"] == 0
    assert common["diffusion_record"]["spatial_feature_channels"] == "@spatial_feature_channels"
    assert common["diffusion_def"]["spatial_feature_channels"] == "@spatial_feature_channels"
