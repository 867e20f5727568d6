"""``custom.checkpoints.state_dict_mismatches``: the one key/shape diff behind the strict loaders, on hand-made
state dicts (expected lists written out by hand)."""

from __future__ import annotations

import pytest
import torch

from custom.checkpoints import StateDictMismatches, load_state_dict_checked, state_dict_mismatches
from custom.errors import MammoInputError


def _t(*shape: int) -> torch.Tensor:
    return torch.zeros(shape)


OWN = {"a.weight": _t(2, 3), "a.bias": _t(2), "bn.running_mean": _t(2), "bn.num_batches_tracked": _t(),
       "b.weight": _t(4, 2)}


def test_identical_state_dicts_have_no_mismatch():
    diff = state_dict_mismatches(OWN, {k: v.clone() for k, v in OWN.items()})
    assert diff == StateDictMismatches([], [], []) and not diff


def test_missing_unexpected_and_shape_mismatches_are_listed_in_order():
    state = {"extra.1": _t(1), "a.weight": _t(3, 2), "bn.running_mean": _t(2), "b.weight": _t(4, 2), "extra.0": _t(5)}
    diff = state_dict_mismatches(OWN, state)
    assert diff  # true when anything differs
    assert diff.missing == ["a.bias", "bn.num_batches_tracked"]  # network order
    assert diff.unexpected == ["extra.1", "extra.0"]  # state dict order
    assert diff.shapes == [("a.weight", (3, 2), (2, 3))]  # (key, state dict shape, network shape)


def test_ignored_suffixes_may_be_absent_but_are_still_shape_checked():
    state = {k: v for k, v in OWN.items() if k != "bn.num_batches_tracked"}
    assert not state_dict_mismatches(OWN, state, ignore=("num_batches_tracked",))
    assert state_dict_mismatches(OWN, state).missing == ["bn.num_batches_tracked"]
    # several suffixes; only the absent keys matching one are forgiven
    partial = {"a.weight": _t(2, 3), "b.weight": _t(4, 2)}
    assert state_dict_mismatches(OWN, partial, ignore=("num_batches_tracked", ".bias")).missing == ["bn.running_mean"]
    # an ignored key present with the wrong shape is still a mismatch
    wrong = {**OWN, "bn.num_batches_tracked": _t(1)}
    assert state_dict_mismatches(OWN, wrong, ignore=("num_batches_tracked",)).shapes == [
        ("bn.num_batches_tracked", (1,), ())]


def test_load_state_dict_checked_words_its_error_from_the_diff():
    net = torch.nn.Linear(3, 2)
    with pytest.raises(MammoInputError) as err:
        load_state_dict_checked(net, {"weight": _t(2, 4), "other": _t(1)}, "m.pt", "test model")
    text = str(err.value)
    assert "m.pt" in text and "test model does not match the configured network" in text
    assert "1 shape mismatch(es), e.g. weight: checkpoint (2, 4) vs model (2, 3)" in text
    assert "1 missing key(s), e.g. bias" in text and "1 unexpected key(s), e.g. other" in text
    good = {"weight": torch.ones(2, 3), "bias": torch.full((2,), 2.0)}
    load_state_dict_checked(net, good, "m.pt", "test model")
    assert torch.equal(net.weight, good["weight"]) and torch.equal(net.bias, good["bias"])


def test_the_strict_loaders_use_the_one_helper():
    """inception and sd_weights import it from the low layer (custom.checkpoints imports neither: test_layering)."""
    from custom.metrics import inception
    from custom.networks import sd_weights

    assert inception.state_dict_mismatches is state_dict_mismatches is sd_weights.state_dict_mismatches
