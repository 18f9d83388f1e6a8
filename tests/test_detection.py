"""ONNX detectors: letterbox, YOLOv8 decoding, NMS and boxes mapped back, on a tiny ONNX model with known outputs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from service.clip.config import DetectorConfig
from service.detection import (
    PAD_VALUE,
    DetectorError,
    OnnxDetector,
    decode_yolov8,
    letterbox,
    nms,
    unletterbox,
)

CLASSES = ["fish", "crab"]
INPUT = (64, 64)


class ConstantDetector(nn.Module):
    """Returns the same raw [4 + C, A] output for every image (the input only sets the batch size)."""

    def __init__(self, raw: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("raw", torch.from_numpy(raw.astype(np.float32)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        zero = images.mean(dim=(1, 2, 3)).mul(0).view(-1, 1, 1)  # keeps the input in the graph
        return self.raw.unsqueeze(0) + zero


def build_constant_detector(path: Path, raw: np.ndarray, input_size: tuple[int, int] = INPUT) -> Path:
    """Export a detector whose output is ``raw`` ([4 + C, A]) for any image, with a dynamic batch axis."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ConstantDetector(raw), (torch.rand(1, 3, *input_size),), str(path), input_names=["images"],
            output_names=["output0"], dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}},
            opset_version=17, dynamo=False,
        )
    return path


def known_raw() -> np.ndarray:
    """Five anchors in model-input pixels (cx, cy, w, h, score fish, score crab), channels first."""
    anchors = [
        (20, 30, 10, 10, 0.90, 0.05),  # kept: the best fish
        (21, 30, 10, 10, 0.80, 0.05),  # same place, same class, weaker: suppressed by NMS
        (21, 30, 10, 10, 0.05, 0.70),  # same place, other class: kept (per-class NMS)
        (50, 40, 8, 8, 0.60, 0.00),    # elsewhere: kept
        (10, 10, 4, 4, 0.10, 0.20),    # below the score threshold
    ]
    return np.asarray(anchors, dtype=np.float32).T  # [6, 5]


EXPECTED_INPUT_BOXES = [  # x1, y1, x2, y2 in model-input pixels, best score first
    ((15, 25, 25, 35), 0, 0.90),
    ((16, 25, 26, 35), 1, 0.70),
    ((46, 36, 54, 44), 0, 0.60),
]


def test_decode_keeps_best_box_per_class_and_drops_low_scores():
    boxes, scores, classes = decode_yolov8(known_raw(), 2, score_threshold=0.25, iou_threshold=0.45)
    assert classes.tolist() == [c for _, c, _ in EXPECTED_INPUT_BOXES]
    np.testing.assert_allclose(scores, [s for _, _, s in EXPECTED_INPUT_BOXES], rtol=1e-6)
    np.testing.assert_allclose(boxes, [b for b, _, _ in EXPECTED_INPUT_BOXES], atol=1e-5)


def test_decode_accepts_anchors_first_layout_and_class_agnostic_nms():
    channels_first = decode_yolov8(known_raw(), 2)
    anchors_first = decode_yolov8(known_raw().T, 2)
    for a, b in zip(channels_first, anchors_first, strict=True):
        np.testing.assert_allclose(a, b)
    _, scores, _ = decode_yolov8(known_raw(), 2, class_agnostic=True)
    np.testing.assert_allclose(scores, [0.90, 0.60], rtol=1e-6)  # the crab box overlaps the better fish box


def test_decode_rejects_a_layout_without_the_class_axis():
    with pytest.raises(ValueError, match=r"\[7, anchors\]"):
        decode_yolov8(known_raw(), 3)


def test_decode_limits_detections_and_handles_none_above_threshold():
    boxes, _, _ = decode_yolov8(known_raw(), 2, max_detections=1)
    assert len(boxes) == 1
    boxes, scores, classes = decode_yolov8(known_raw(), 2, score_threshold=0.95)
    assert boxes.shape == (0, 4) and scores.shape == (0,) and classes.shape == (0,)


def test_nms_suppresses_only_overlaps_above_the_threshold():
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [100, 100, 110, 110]], dtype=np.float64)
    scores = np.array([0.8, 0.9, 0.7])
    assert nms(boxes, scores, iou_threshold=0.30).tolist() == [1, 2]  # IoU(0, 1) = 1/3: the weaker one goes
    assert nms(boxes, scores, iou_threshold=0.34).tolist() == [1, 0, 2]


def test_letterbox_keeps_aspect_ratio_pads_grey_and_maps_boxes_back():
    img = Image.new("RGB", (32, 16), (255, 0, 0))  # wide: scaled x2 to 64x32, 16 px of padding above and below
    x, lb = letterbox(img, INPUT)
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    assert (lb.scale, lb.pad_left, lb.pad_top) == (2.0, 0, 16)
    np.testing.assert_allclose(x[:, :16], PAD_VALUE / 255, atol=1e-7)
    np.testing.assert_allclose(x[:, 48:], PAD_VALUE / 255, atol=1e-7)
    np.testing.assert_allclose(x[:, 16:48, :, ].transpose(1, 2, 0)[..., 0], 1.0)
    back = unletterbox(np.array([[10, 26, 30, 36], [-4, 0, 80, 70]], dtype=np.float64), lb)
    np.testing.assert_allclose(back, [[5, 5, 15, 10], [0, 0, 32, 16]])  # the second is clipped to the image


def test_onnx_detector_returns_known_boxes_in_each_images_pixels(tmp_path):
    path = build_constant_detector(tmp_path / "det.onnx", known_raw())
    detector = OnnxDetector(DetectorConfig(name="tiny", onnx=path, classes=CLASSES))
    assert detector.input_size == INPUT  # read from the model's static input shape
    wide = Image.new("RGB", (32, 16))   # scale 2, pad top 16
    tall = Image.new("RGB", (16, 64))   # scale 1, pad left 24
    found_wide, found_tall = detector.detect([wide, tall])
    assert [(d.class_name, round(d.score, 2)) for d in found_wide] == [("fish", 0.9), ("crab", 0.7), ("fish", 0.6)]
    np.testing.assert_allclose(found_wide[0].box, (7.5, 4.5, 12.5, 9.5), atol=1e-5)   # (15-0)/2, (25-16)/2, ...
    np.testing.assert_allclose(found_wide[2].box, (23, 10, 27, 14), atol=1e-5)
    np.testing.assert_allclose(found_tall[0].box, (0, 25, 1, 35), atol=1e-5)          # x clipped at the image edge
    np.testing.assert_allclose(found_tall[1].box, (0, 25, 2, 35), atol=1e-5)
    assert len(found_tall) == 2  # the third box lies in the padding, outside the image: dropped


def test_onnx_detector_checks_its_configuration(tmp_path):
    path = build_constant_detector(tmp_path / "det.onnx", known_raw())
    with pytest.raises(DetectorError, match="no axis of 4 \\+ 3 classes"):
        OnnxDetector(DetectorConfig(name="tiny", onnx=path, classes=["a", "b", "c"]))
    with pytest.raises(DetectorError, match="not found"):
        OnnxDetector(DetectorConfig(name="gone", onnx=tmp_path / "missing.onnx", classes=CLASSES))
