"""GCDM's evaluation protocol: test-set selection, the reference breast rule, the pooled confusion matrix on a
hand-made example, and a box-prompted SAM segmenter from a tiny random SamModel saved locally."""

from __future__ import annotations

import numpy as np
import pytest

from custom.metrics.protocol import (GCDM_SAMPLING, PooledConfusion, SamBoxSegmenter, compose_label,
                                     gcdm_test_entries, lesion_boxes, reference_breast_mask)


def test_selection_and_sampling_settings():
    entries = [{"case_id": "a", "num_lesions": 1}, {"case_id": "b", "num_lesions": 0}, {"case_id": "c", "num_lesions": 2}]
    assert [e["case_id"] for e in gcdm_test_entries(entries)] == ["a", "c"]
    assert GCDM_SAMPLING == {"samples_per_mask": 1, "ddim_steps": 50, "ddim_eta": 1.0, "guidance_scale": 3.0}


def test_pooled_confusion_hand_made():
    """Two 2x3 images. Truth/prediction counts by hand: image 1 truth [0 1 1 / 1 2 2], pred [0 1 1 / 2 2 0];
    image 2 truth [0 0 1 / 1 1 2], pred [0 1 1 / 1 1 2]."""
    c = PooledConfusion(3)
    c.update(np.array([[0, 1, 1], [2, 2, 0]]), np.array([[0, 1, 1], [1, 2, 2]]))
    c.update(np.array([[0, 1, 1], [1, 1, 2]]), np.array([[0, 0, 1], [1, 1, 2]]))
    # rows truth, columns prediction
    assert c.matrix.tolist() == [[2, 1, 0], [0, 5, 1], [1, 0, 2]]
    s = c.scores()
    assert s["pixel_accuracy"] == pytest.approx(100 * 9 / 12)
    assert s["breast_iou"] == pytest.approx(100 * 5 / (6 + 6 - 5))   # TP 5, truth 6, predicted 6
    assert s["mass_iou"] == pytest.approx(100 * 2 / (3 + 3 - 2))     # TP 2, truth 3, predicted 3


def test_reference_breast_mask_keeps_the_largest_region_and_drops_specks():
    img = np.zeros((40, 40), dtype=np.uint8)
    img[5:35, 0:20] = 200          # breast against the left edge
    img[10:13, 30:33] = 255        # a 3x3 label speck: gone after the 5x5 erosion
    img[20, 10] = 10               # a dark pixel inside the breast (below 15): closed again
    m = reference_breast_mask(img)
    assert not m[10:13, 30:33].any()
    assert m[20, 10] and m[20, 0]  # the image border does not erode the breast (OpenCV's default border)
    assert abs(int(m.sum()) - 30 * 20) <= 2 * 30  # the region, up to the erode/dilate rounding at its edges


def test_boxes_and_composed_label():
    inst = np.zeros((10, 10), dtype=np.uint8)
    inst[2:4, 3:6] = 1
    inst[7, 8] = 2
    assert lesion_boxes(inst) == [(3, 2, 5, 3), (8, 7, 8, 7)]
    lab = compose_label(np.ones((10, 10)), inst > 0)
    assert lab[2, 3] == 2 and lab[0, 0] == 1


def test_sam_box_segmenter_from_a_local_tiny_model(tmp_path):
    import torch
    from transformers import (SamConfig, SamImageProcessor, SamMaskDecoderConfig, SamModel, SamProcessor,
                              SamPromptEncoderConfig, SamVisionConfig)

    torch.manual_seed(0)
    vc = SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                         patch_size=16, mlp_dim=64, global_attn_indexes=[1], window_size=2, num_pos_feats=8)
    pc = SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4)
    mc = SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32,
                              iou_head_hidden_dim=16)
    SamModel(SamConfig(vision_config=vc.to_dict(), prompt_encoder_config=pc.to_dict(),
                       mask_decoder_config=mc.to_dict())).save_pretrained(tmp_path / "sam")
    SamProcessor(SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})).save_pretrained(tmp_path / "sam")
    seg = SamBoxSegmenter(tmp_path / "sam")
    img = np.random.default_rng(0).random((48, 40))
    one, two = seg(img, [(5, 5, 20, 30)]), seg(img, [(5, 5, 20, 30), (25, 30, 35, 40)])
    assert one.shape == (48, 40) and one.dtype == bool
    assert not seg(img, []).any()
    assert (two | one).sum() == two.sum()  # the union over boxes contains each box's mask
    from custom.errors import MammoInputError

    with pytest.raises(MammoInputError, match="not a transformers SAM/MedSAM folder"):
        SamBoxSegmenter(tmp_path)


def test_gcdm_confusion_pools_breast_rule_and_box_prompted_lesions_by_hand():
    """Two 20x20 images, hand-built so the reference breast rule gives known regions, and a stub box segmenter that
    fills each box: the pooled matrix is counted by hand."""
    from custom.metrics.protocol import gcdm_confusion

    imgs = np.zeros((2, 20, 20))
    imgs[:, :, :10] = 0.8                      # breast: the left half (the rule keeps it exactly: border-touching block)
    labels = np.zeros((2, 20, 20), np.uint8)
    labels[:, :, :12] = 1                      # truth breast two columns wider than the image's
    inst = np.zeros((2, 20, 20), np.uint8)
    inst[0, 4:8, 2:6] = 1                      # image 0: a 4x4 lesion; image 1: none
    labels[0][inst[0] > 0] = 2
    calls = []

    def fill_box(i, img, boxes):
        calls.append((i, boxes))
        out = np.zeros(img.shape, bool)
        for x0, y0, x1, y1 in boxes:
            out[y0 : y1 + 2, x0 : x1 + 1] = True  # one row too many below the box: 4 false-positive lesion pixels
        return out

    conf = gcdm_confusion(imgs[:, None], labels, inst, fill_box)
    assert calls == [(0, [(2, 4, 5, 7)])]      # prompted with the ground-truth box; not called without a lesion
    bg, br, le = 0, 1, 2
    m = np.zeros((3, 3), int)
    m[bg, bg] = 2 * 20 * 8                     # columns 12..19
    m[br, bg] = 2 * 20 * 2                     # columns 10, 11: truth breast, image background
    m[br, br] = 2 * 20 * 10 - 16 - 4           # image 0 loses the lesion (16) and the extra row (4)
    m[br, le] = 4
    m[le, le] = 16
    assert conf.matrix.tolist() == m.tolist()
    s = conf.scores()
    assert s["mass_iou"] == pytest.approx(100 * 16 / 20)
    assert s["pixel_accuracy"] == pytest.approx(100 * (m[0, 0] + m[1, 1] + 16) / 800)


def test_protocol_settings_defaults_deviations_and_bad_values():
    from custom.engines.evaluation import PROJECT_SAMPLING, protocol_settings
    from custom.errors import MammoInputError

    g = protocol_settings("gcdm")
    assert (g["ddim_steps"], g["ddim_eta"], g["guidance_scale"], g["diversity_cases"]) == (50, 1.0, 3.0, 0)
    assert g["protocol_deviations"] == {}
    p = protocol_settings("project")
    assert {k: p[k] for k in PROJECT_SAMPLING} == {"ddim_steps": 20, "ddim_eta": 1.0, "guidance_scale": 3.0,
                                                   "diversity_cases": 3}
    # the project protocol samples as the bundle's own workflows do by default (one sampler setting, not four)
    import json
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "bundle" / "configs"
    for name in ("inference.json", "train_diffusion.json", "synthesize.json"):
        cfg = json.loads((configs / name).read_text())
        assert (cfg["ddim_eta"], cfg["guidance_scale"]) == (p["ddim_eta"], p["guidance_scale"]), name
    assert json.loads((configs / "inference.json").read_text())["ddim_steps"] == p["ddim_steps"]
    d = protocol_settings("gcdm", ddim_steps=10)
    assert d["ddim_steps"] == 10 and d["protocol_deviations"] == {"ddim_steps": {"reference": 50, "used": 10}}
    assert protocol_settings("project", ddim_steps=7)["protocol_deviations"] == {}
    assert protocol_settings("gcdm", sampler="pndm")["protocol_deviations"] == {"sampler": {"reference": "ddim", "used": "pndm"}}
    assert protocol_settings("gcdm", sampler="ddim")["protocol_deviations"] == {}
    assert protocol_settings("project", sampler="pndm")["protocol_deviations"] == {}  # the project protocol has none
    with pytest.raises(MammoInputError, match="--protocol"):
        protocol_settings("paper")
    with pytest.raises(MammoInputError, match="--sam_path"):
        protocol_settings("project", sam_path="/some/sam")
    with pytest.raises(MammoInputError, match="--ddim_steps"):
        protocol_settings("gcdm", ddim_steps=0)
