"""Clinical attributes: vocabulary and parsing (datalist, --attributes, prompt, DICOM), the attribute token source
with per-attribute CFG dropping, a tiny network that learns to read an attribute, and the phantom's attribute
content (density, vendor, breast area, lesion-free truth)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from custom.data.attributes import (
    ATTRIBUTES,
    area_bin,
    attach_attribute_codes,
    attributes_from_dicom,
    attributes_from_entry,
    decode_attributes,
    describe_attributes,
    encode_attributes,
    merge_attributes,
    normalise_value,
    parse_attribute_string,
    parse_prompt,
)
from custom.errors import MammoInputError


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _msg(fn) -> str:
    with pytest.raises(MammoInputError) as info:
        fn()
    return str(info.value)


# ------------------------------------------------------------------------------------------------ parsing
def test_attribute_string_hand_written_cases():
    assert parse_attribute_string("view=MLO,density=D,area=small") == {"view": "MLO", "density": "D", "area": "small"}
    assert parse_attribute_string(" vendor = Siemens , side=left, birads=BI-RADS 4A ") == {
        "manufacturer": "siemens", "laterality": "L", "breast_birads": "4"}
    assert parse_attribute_string("density=very high,area=0.65") == {"density": "D", "area": "large"}
    assert parse_attribute_string(None) == {} and parse_attribute_string("") == {}
    assert parse_attribute_string({"view": "cc"}) == {"view": "CC"}
    m = _msg(lambda: parse_attribute_string("view=MLO,colour=red"))
    assert m.startswith("attributes:") and "'colour'" in m and "density" in m
    m = _msg(lambda: parse_attribute_string("density=E"))
    assert "'E'" in m and "A, B, C, D" in m
    assert "name=value" in _msg(lambda: parse_attribute_string("view"))
    assert "twice" in _msg(lambda: parse_attribute_string("view=CC,view=MLO"))


def test_prompt_parser_hand_written_cases():
    assert parse_prompt("a siemens mammogram in MLO view with high density and small area") == {
        "manufacturer": "siemens", "view": "MLO", "density": "C", "area": "small"}
    assert parse_prompt("a mammogram in MLO view with high density") == {"view": "MLO", "density": "C"}
    assert parse_prompt("A Hologic mammogram in CC view with very low density and big area") == {
        "manufacturer": "hologic", "view": "CC", "density": "A", "area": "large"}
    assert parse_prompt("healthy right breast, mediolateral oblique, density B, BI-RADS 1") == {
        "lesion_category": "none", "laterality": "R", "view": "MLO", "density": "B", "breast_birads": "1"}
    assert parse_prompt("a GE Healthcare mammogram with a mass") == {"manufacturer": "ge", "lesion_category": "mass"}
    assert parse_prompt("a mammogram without lesions") == {"lesion_category": "none"}
    assert parse_prompt(None) == {} and parse_prompt("a mammogram") == {}
    m = _msg(lambda: parse_prompt("a mammogram in MLO view with fluffy density"))
    assert m.startswith("prompt:") and "'fluffy'" in m and "word 7" in m
    assert "'density'" in _msg(lambda: parse_prompt("a mammogram with density"))
    assert "contradicts" in _msg(lambda: parse_prompt("a CC mammogram in MLO view"))


def test_values_from_dataset_strings_and_area_rule():
    assert normalise_value("density", "DENSITY C") == "C"
    assert normalise_value("breast_birads", "BI-RADS 5") == "5"
    assert normalise_value("lesion_category", "['Mass']") == "mass"
    assert normalise_value("manufacturer", "HOLOGIC, Inc.") == "hologic"
    assert normalise_value("manufacturer", "GE MEDICAL SYSTEMS - mammo_gcdm phantom") == "ge"
    # MAM-E: < 0.4 small, 0.4 - 0.6 medium, > 0.6 large
    assert [area_bin(r) for r in (0.0, 0.399, 0.4, 0.6, 0.601, 1.0)] == ["small", "small", "medium", "medium", "large", "large"]
    with pytest.raises(ValueError):
        area_bin(1.5)


def test_dicom_tags_and_datalist_entry(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    ds.ViewPosition, ds.ImageLaterality, ds.Manufacturer = "MLO", "R", "SIEMENS"
    path = tmp_path / "ref.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert attributes_from_dicom(path) == {"view": "MLO", "laterality": "R", "manufacturer": "siemens"}
    ds.ViewPosition, ds.Manufacturer = "ML", "ACME Imaging"
    ds.save_as(path, enforce_file_format=True)
    assert attributes_from_dicom(path) == {"laterality": "R", "manufacturer": "other"}
    assert "not found" in _msg(lambda: attributes_from_dicom(tmp_path / "none.dcm"))

    lab = np.zeros((10, 10), dtype=np.uint8)
    lab[:, :7] = 1  # 70 % breast -> large
    lab[2:4, 2:4] = 2
    (tmp_path / "labels").mkdir()
    Image.fromarray(lab).save(tmp_path / "labels" / "c.png")
    entry = {"case_id": "c", "label": "labels/c.png", "view": "CC", "laterality": "L", "density": "DENSITY D",
             "breast_birads": "BI-RADS 4", "num_lesions": 2, "findings": [
                 {"category": "Mass", "birads": "BI-RADS 3"}, {"category": "Suspicious Calcification", "birads": "BI-RADS 4"}],
             "source_image": str(path)}
    assert attributes_from_entry(entry, tmp_path) == {
        "view": "CC", "laterality": "L", "density": "D", "breast_birads": "4", "lesion_category": "calcification",
        "lesion_birads": "4", "area": "large", "manufacturer": "other"}
    healthy = {"case_id": "h", "view": "MLO", "num_lesions": 0, "findings": []}
    assert attributes_from_entry(healthy) == {"view": "MLO", "lesion_category": "none", "lesion_birads": "none"}


def test_merge_encode_decode_and_describe():
    a = merge_attributes(("attributes", {"view": "MLO"}), ("prompt", {"view": "MLO", "density": "C"}))
    assert a == {"view": "MLO", "density": "C"}
    m = _msg(lambda: merge_attributes(("attributes", {"view": "CC"}), ("prompt", {"view": "MLO"})))
    assert m.startswith("prompt:") and "view=MLO contradicts view=CC from attributes" in m
    names = ["view", "density", "area"]
    codes = encode_attributes({"density": "D", "view": "CC"}, names)
    assert codes.dtype == np.int64 and codes.tolist() == [0, 3, -1]
    assert decode_attributes(codes, names) == {"view": "CC", "density": "D"}
    assert "manufacturer" in _msg(lambda: encode_attributes({"manufacturer": "ge"}, names))
    assert describe_attributes({"manufacturer": "siemens", "view": "MLO", "density": "C", "area": "small"}) == \
        "a siemens mammogram in MLO view with high density and small area"


def test_attach_codes_from_prepared_datalist(prepared_dir):
    from custom.data.training import load_prepared_datalist

    items = load_prepared_datalist(prepared_dir, "training", limit=4)
    assert attach_attribute_codes(items, prepared_dir, []) == items  # off: unchanged
    out = attach_attribute_codes(items, prepared_dir, ["view", "density", "area", "manufacturer", "lesion_category"])
    for it in out:
        codes = it["attributes"]
        assert codes.shape == (5,) and (codes >= 0).all()  # the phantom datalist carries every one of them
        attrs = decode_attributes(codes, ["view", "density", "area", "manufacturer", "lesion_category"])
        assert attrs["view"] == it["view"] and attrs["density"] == str(it["density"]).split()[-1]
        assert (attrs["lesion_category"] == "none") == (it["num_lesions"] == 0)


# ------------------------------------------------------------------------------------------------ token source
def test_attribute_tokens_null_and_per_attribute_dropping():
    from custom.networks.attributes import AttributeTokens

    torch.manual_seed(0)
    src = AttributeTokens(["view", "density", "area"], token_dim=8, drop_rates={"view": 0.0, "density": 1.0, "area": 0.3})
    codes = torch.tensor([[1, 2, 0]] * 4000)
    null = src.tables["density"].weight[len(ATTRIBUTES["density"])]
    src.eval()
    tok = src(codes)
    assert tok.shape == (4000, 3, 8)
    assert torch.equal(tok[0, 0], src.tables["view"].weight[1]) and torch.equal(tok[0, 1], src.tables["density"].weight[2])
    missing = src(torch.tensor([[-1, -1, -1]]))
    assert torch.equal(missing[0, 1], null)  # not given == the learned null token
    src.train()
    tok = src(codes)
    dropped = src.last_dropped
    assert not dropped[:, 0].any() and dropped[:, 1].all()  # rate 0 never, rate 1 always
    assert abs(dropped[:, 2].float().mean().item() - 0.3) < 0.03  # its own rate
    assert torch.equal(tok[dropped[:, 2], 2][0], src.tables["area"].weight[len(ATTRIBUTES["area"])])
    with pytest.raises(ValueError):
        src(torch.tensor([[2, 0, 0]]))  # view has 2 values
    with pytest.raises(MammoInputError):
        AttributeTokens(["view", "colour"], 8)


def _tiny_network(names, mode="tokens"):
    from custom.networks.attributes import attribute_token_sources, time_attribute_names
    from custom.networks.gcdm import GCDMNetwork

    return GCDMNetwork(
        latent_channels=2, mask_latent_channels=0, max_lesions=1,
        conditioner={"mode": "off", "radiomic_dim": 67, "token_dim": 16, "num_tokens": 1},
        unet_kwargs={"channels": [8, 8], "attention_levels": [False, True], "num_res_blocks": 1, "num_head_channels": 8,
                     "norm_num_groups": 4},
        token_sources=attribute_token_sources(names, 16, {n: 0.2 for n in names}, mode=mode),
        time_attributes=time_attribute_names(names, mode), time_attribute_drop={n: 0.2 for n in names},
    )


@pytest.mark.parametrize("mode", ["tokens", "time"])
def test_tiny_network_learns_to_read_an_attribute(mode):
    """Target noise +1 for CC and -1 for MLO: after a few steps the prediction follows the view; an attribute that is
    not given uses the null token (same output as dropping it)."""
    torch.manual_seed(0)
    net = _tiny_network(["view", "density"], mode)
    assert net.attribute_names == ("view", "density")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    b = 8
    kw = dict(mask_latent=None, features=torch.zeros(b, 1, 67), lesion_masks=torch.zeros(b, 1, 8, 8),
              lesion_present=torch.zeros(b, 1))
    for _ in range(150):
        view = torch.randint(0, 2, (b,))
        codes = torch.stack([view, torch.randint(0, 4, (b,))], dim=1)
        x = torch.randn(b, 2, 8, 8)
        target = (1.0 - 2.0 * view.float()).view(b, 1, 1, 1).expand(b, 2, 8, 8)
        loss = torch.nn.functional.mse_loss(net(x, torch.randint(0, 100, (b,)), attributes=codes, **kw), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x = torch.randn(2, 2, 8, 8)
    t = torch.tensor([50, 50])
    kw2 = {k: v[:2] for k, v in kw.items() if v is not None}
    with torch.no_grad():
        out = net(x, t, mask_latent=None, attributes=torch.tensor([[0, 1], [1, 1]]), **kw2)
        assert out[0].mean() > 0.5 and out[1].mean() < -0.5  # CC -> +1, MLO -> -1
        given_null = net(x, t, mask_latent=None, attributes=torch.tensor([[-1, 1], [-1, 1]]), **kw2)
        lesion = net.conditioner(torch.zeros(2, 67), torch.zeros(2, 1, 8, 8))
        drop = torch.tensor([[True, False]] * 2)
        if mode == "tokens":
            src = net.token_sources["attributes"]
            forced = net.unet(x, t, context=torch.cat([lesion, src(torch.tensor([[1, 1], [0, 1]]), drop=drop)], 1))
        else:
            emb = net.unet.class_embedding
            forced = _unet_with_time_shift(net.unet, x, t, lesion, emb(torch.tensor([[1, 1], [0, 1]]), drop=drop))
        assert torch.allclose(given_null, forced, atol=1e-5)  # "not given" == dropped to the null token
        assert given_null[0].mean().abs() < out[0].mean().abs()  # the null view is neither


def _unet_with_time_shift(unet, x, t, context, shift):
    """The UNet's output with ``shift`` (B, D) added to its timestep embedding, computed without the class hook: a
    copy of the UNet without class embedding whose last time-embedding bias is moved by each row's shift."""
    import copy

    rows = []
    for i in range(x.shape[0]):
        plain = copy.deepcopy(unet)
        plain.num_class_embeds = None
        plain.class_embedding = None
        with torch.no_grad():
            plain.time_embed[-1].bias += shift[i]
        rows.append(plain(x[i : i + 1], t[i : i + 1], context=context[i : i + 1]))
    return torch.cat(rows)


def test_time_mode_adds_the_summed_embeddings_to_the_time_embedding():
    """attribute_mode "time": the embedding is the sum of the attribute rows (nulls where not given), it moves the
    UNet's timestep embedding exactly, and the unconditional branch (features and mask dropped) sees every null."""
    from custom.networks.attributes import AttributeEmbedding, attribute_token_sources, check_attribute_mode, time_attribute_names

    torch.manual_seed(1)
    emb = AttributeEmbedding(["view", "density"], 6).eval()
    got = emb(torch.tensor([[1, 3], [-1, 0]]))
    v, d = emb.tables["view"].weight, emb.tables["density"].weight
    assert torch.allclose(got[0], v[1] + d[3]) and torch.allclose(got[1], v[2] + d[0])  # row 2 of view = its null
    net = _tiny_network(["view", "density"], "time").eval()
    assert not len(net.token_sources) and net.time_attributes == ("view", "density")
    with torch.no_grad():  # random non-zero weights (MONAI zero-initialises the output convolution)
        for param in net.unet.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([10, 700])
    kw = dict(mask_latent=None, features=torch.zeros(2, 1, 67), lesion_masks=torch.zeros(2, 1, 8, 8),
              lesion_present=torch.zeros(2, 1))
    codes = torch.tensor([[0, 2], [1, -1]])
    with torch.no_grad():
        out = net(x, t, attributes=codes, **kw)
        lesion = net.conditioner(torch.zeros(2, 67), torch.zeros(2, 1, 8, 8))
        ref = _unet_with_time_shift(net.unet, x, t, lesion, net.unet.class_embedding(codes))
        assert torch.allclose(out, ref, atol=1e-5)
        other = net(x, t, attributes=torch.tensor([[0, 3], [1, -1]]), **kw)
        assert not torch.allclose(out[0], other[0]) and torch.allclose(out[1], other[1])  # only row 0 changed
        flags = torch.tensor([True, False])
        uncond = net(x, t, attributes=codes, drop_features=flags, drop_mask=flags, **kw)
        nulls = net(x, t, attributes=torch.tensor([[-1, -1], [1, -1]]), drop_features=flags, drop_mask=flags, **kw)
        assert torch.allclose(uncond, nulls) and not torch.allclose(uncond[0], out[0])
    with pytest.raises(ValueError, match="attributes"):
        net(x, t, **kw)  # the codes are required
    assert attribute_token_sources(["view"], 16, mode="time") is None and time_attribute_names(["view"], "tokens") == ()
    with pytest.raises(ValueError, match="attribute_mode: must be one of tokens, time"):
        check_attribute_mode("film")


# ------------------------------------------------------------------------------------------------ phantom
def test_phantom_density_vendor_area_and_lesion_free_truth():
    from custom.data.phantom import PHANTOM_VENDORS, _render, phantom_image

    # density: glandular fraction follows the tag -> mean breast brightness rises A < B < C < D (same outline/texture)
    means = [float(_render(1, 0, 0, (160, 128), d, 0).display[_render(1, 0, 0, (160, 128), d, 0).breast].mean())
             for d in "ABCD"]
    assert means == sorted(means) and means[-1] - means[0] > 0.1
    # vendor: the tone curve changes the appearance of the same image
    a = _render(1, 0, 0, (160, 128), "C", 0, vendor="SIEMENS").display
    b = _render(1, 0, 0, (160, 128), "C", 0, vendor="GE MEDICAL SYSTEMS").display
    assert a.mean() > b.mean() + 0.02 and set(PHANTOM_VENDORS) == {"SIEMENS", "HOLOGIC", "GE MEDICAL SYSTEMS"}
    # breast area class: small < medium < large breast pixels
    areas = [_render(1, 0, 0, (160, 128), "C", 0, area_class=c).breast.mean() for c in ("small", "medium", "large")]
    assert areas[0] < areas[1] < areas[2]
    # lesion-free truth: identical outside the masses, different inside them
    img = next(phantom_image(0, s, i, (160, 128)) for s in range(6) for i in range(4)
               if phantom_image(0, s, i, (160, 128)).masses)
    assert img.lesion_free_stored is not None and img.lesion_free_stored.shape == img.stored.shape
    assert img.vendor in PHANTOM_VENDORS and img.dataset.Manufacturer.startswith(img.vendor)
    inside = np.zeros(img.stored.shape, dtype=bool)
    for m in img.masses:
        x0, y0, x1, y1 = m["box"]
        inside[max(0, y0 - 12):y1 + 12, max(0, x0 - 12):x1 + 12] = True
    diff = img.stored.astype(np.int64) - img.lesion_free_stored.astype(np.int64)
    assert (diff[~inside] == 0).all() and np.abs(diff[inside]).max() > 0


def test_phantom_writes_lesion_free_dicoms(phantom_dir):
    import pydicom

    from custom.data.attributes import attributes_from_dicom
    from custom.data.phantom import LESION_FREE_DIR
    from custom.data.prepare import load_display_image

    files = sorted((phantom_dir / LESION_FREE_DIR).glob("*/*.dicom"))
    assert files
    for f in files[:3]:
        src = phantom_dir / "images" / f.parent.name / f.name
        a, _ = load_display_image(src)
        b, _ = load_display_image(f)
        assert a.shape == b.shape and (a != b).any() and np.mean(a == b) > 0.9
        assert "LESION-FREE" in str(pydicom.dcmread(f, stop_before_pixels=True).SeriesDescription)
        assert attributes_from_dicom(src)["manufacturer"] in ("siemens", "hologic", "ge")


@pytest.mark.parametrize("mode", ["tokens", "time"])
def test_attribute_guidance_is_the_two_term_formula(mode):
    """guided_noise with attribute_guidance s_a equals eps_u + s (eps_n - eps_u) + s_a (eps_c - eps_n) built from
    three separate network calls; s_a == s is plain CFG; a sampler run gives the same latents with the context
    computed once or at every step."""
    from monai.networks.schedulers import DDIMScheduler

    from custom.engines.sampling import ddim_sample, guided_noise

    torch.manual_seed(2)
    net = _tiny_network(["view", "density"], mode).eval()
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    b = 2
    x, t = torch.randn(b, 2, 8, 8), torch.tensor([100, 600])
    codes = torch.tensor([[0, 3], [1, -1]])
    cond = dict(mask_latent=None, features=torch.zeros(b, 1, 67), lesion_masks=torch.zeros(b, 1, 8, 8),
                lesion_present=torch.zeros(b, 1), attributes=codes)
    no, yes = torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)
    with torch.no_grad():
        eps_c = net(x, t, drop_features=no, drop_mask=no, **cond)
        eps_u = net(x, t, drop_features=yes, drop_mask=yes, **cond)
        eps_n = net(x, t, drop_features=no, drop_mask=no, **{**cond, "attributes": torch.full_like(codes, -1)})
        s, sa = 3.0, 7.0
        got = guided_noise(net, x, t, cond, s, attribute_guidance=sa)
        # (batched 3B vs single forwards differ by ~2e-6, amplified by the scales)
        assert torch.allclose(got, eps_u + s * (eps_n - eps_u) + sa * (eps_c - eps_n), atol=1e-4)
        assert (got - guided_noise(net, x, t, cond, s)).abs().max() > 1e-2  # it does change the guidance
        assert torch.allclose(guided_noise(net, x, t, cond, s, attribute_guidance=s), guided_noise(net, x, t, cond, s),
                              atol=1e-4)
        sched = DDIMScheduler(1000, schedule="scaled_linear_beta", clip_sample=False)
        kw = dict(features=cond["features"], lesion_masks=cond["lesion_masks"], lesion_present=cond["lesion_present"],
                  num_inference_steps=3, guidance_scale=s, seed=[0, 1], progress=False, attributes=codes,
                  attribute_guidance=sa)
        once = ddim_sample(net, sched, torch.zeros(b, 0, 8, 8), **kw).latents
        every = ddim_sample(net, sched, torch.zeros(b, 0, 8, 8), context_once=False, **kw).latents
        assert torch.allclose(once, every, atol=1e-5)


def test_attribute_guidance_option_checks():
    from monai.networks.schedulers import DDIMScheduler

    from custom.engines.edit import EditSamplingInferer
    from custom.engines.inference import GCDMSamplingInferer, check_sampling_options

    assert check_sampling_options(20, 3.0, attribute_guidance="5")["attribute_guidance"] == 5.0
    for bad in (-1, "nan", 101, "x"):
        with pytest.raises(MammoInputError, match="^attribute_guidance: "):
            check_sampling_options(20, 3.0, attribute_guidance=bad)
    with pytest.raises(MammoInputError, match="attribute_guidance"):
        GCDMSamplingInferer(DDIMScheduler(1000), torch.nn.Linear(1, 1), attribute_guidance=-2)
    inferer = EditSamplingInferer(DDIMScheduler(1000), torch.nn.Linear(1, 1), num_inference_steps=2, progress=False,
                                  attribute_guidance=5)
    plain = _tiny_network(["view"], "tokens")
    plain.token_sources = torch.nn.ModuleDict()  # a model without attributes
    with pytest.raises(MammoInputError, match="^attribute_guidance: the model was trained without attributes"):
        inferer(torch.zeros(1, 1, 8, 8), plain)


def test_mask_dropped_sampling_computes_the_context_once_with_the_same_output():
    """Mask-free sampling wraps the network in MaskDropped; its context (mask dropped for every row) lets the sampler
    compute the lesion context once per run, with the output of the per-step computation."""
    from monai.networks.schedulers import DDIMScheduler

    from custom.engines.edit import MaskDropped
    from custom.engines.sampling import ddim_sample, sampling_context

    torch.manual_seed(3)
    net = _tiny_network(["view", "density"], "tokens").eval()
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    wrapped = MaskDropped(net)
    b = 2
    cond = dict(features=torch.randn(b, 1, 67), lesion_masks=torch.zeros(b, 1, 8, 8), lesion_present=torch.zeros(b, 1),
                attributes=torch.tensor([[0, 1], [1, 3]]))
    with torch.no_grad():
        ctx = sampling_context(wrapped, {"mask_latent": None, **cond}, b, 3.0, torch.device("cpu"))
        flags = torch.tensor([False, False, True, True])
        expected = net.context(*(torch.cat([cond[k], cond[k]]) for k in ("features", "lesion_masks", "lesion_present")),
                               drop_features=flags, drop_mask=torch.ones(4, dtype=torch.bool),
                               attributes=torch.cat([cond["attributes"]] * 2))
        assert ctx is not None and torch.equal(ctx, expected)
        kw = dict(num_inference_steps=3, guidance_scale=3.0, seed=[0, 1], progress=False, **cond)
        sched = DDIMScheduler(1000, schedule="scaled_linear_beta", clip_sample=False)
        once = ddim_sample(wrapped, sched, torch.zeros(b, 0, 8, 8), **kw).latents
        every = ddim_sample(wrapped, sched, torch.zeros(b, 0, 8, 8), context_once=False, **kw).latents
        assert torch.allclose(once, every, atol=1e-5)
