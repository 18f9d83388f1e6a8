"""ONNX object detectors with the single-output YOLOv8 layout, on onnxruntime.

The model takes a letterboxed float32 [N, 3, H, W] image in [0, 1] (aspect ratio kept, grey 114
padding, as Ultralytics exports expect) and returns [N, 4 + C, A]: per anchor a box (centre x,
centre y, width, height, in input pixels) and C class scores (already sigmoid-ed, no objectness).
The transposed [N, A, 4 + C] is accepted too. Decoding keeps each anchor's best class above the
score threshold, runs greedy NMS (per class unless class-agnostic) and maps the boxes back through
the letterbox to the original image's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from service.clip.config import DetectorConfig
from service.clip.towers import make_session

PAD_VALUE = 114


class DetectorError(RuntimeError):
    """A detector model that does not fit the configuration; the message names the detector."""


@dataclass
class Detection:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in the original image's pixels
    class_id: int
    class_name: str
    score: float


@dataclass(frozen=True)
class Letterbox:
    """How an image was placed in the model input: ``input = original * scale + pad``."""

    scale: float
    pad_left: int
    pad_top: int
    width: int  # the original image's size
    height: int


def letterbox(img: Image.Image, size: tuple[int, int]) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping the aspect ratio and pad to ``size`` (height, width) -> float32 [3, H, W] in [0, 1]."""
    out_h, out_w = size
    width, height = img.size
    scale = min(out_h / height, out_w / width)
    new_w, new_h = round(width * scale), round(height * scale)
    dw, dh = (out_w - new_w) / 2, (out_h - new_h) / 2
    left, top = round(dw - 0.1), round(dh - 0.1)  # Ultralytics' rounding of an odd padding
    resized = img.convert("RGB")
    if (new_w, new_h) != img.size:
        resized = resized.resize((new_w, new_h), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (out_w, out_h), (PAD_VALUE,) * 3)
    canvas.paste(resized, (left, top))
    x = np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
    return x, Letterbox(scale, left, top, width, height)


def unletterbox(boxes: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Boxes [K, 4] (x1, y1, x2, y2) in model-input pixels -> original-image pixels, clipped to the image."""
    out = boxes.astype(np.float64).copy()
    out[:, [0, 2]] = (out[:, [0, 2]] - lb.pad_left) / lb.scale
    out[:, [1, 3]] = (out[:, [1, 3]] - lb.pad_top) / lb.scale
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, lb.width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, lb.height)
    return out


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box [4] with boxes [K, 4], all x1, y1, x2, y2."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, limit: int | None = None) -> np.ndarray:
    """Greedy non-maximum suppression: indices of kept boxes, best score first."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size and (limit is None or len(keep) < limit):
        best, order = order[0], order[1:]
        keep.append(int(best))
        if order.size:
            order = order[box_iou(boxes[best], boxes[order]) <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def decode_yolov8(
    output: np.ndarray,
    num_classes: int,
    *,
    score_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    max_detections: int = 300,
    class_agnostic: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's raw output ([4 + C, A] or [A, 4 + C]) -> boxes [K, 4] xyxy, scores [K], class ids [K]."""
    channels = 4 + num_classes
    if output.ndim != 2 or channels not in output.shape:
        raise ValueError(f"expected [{channels}, anchors] or [anchors, {channels}] per image, got {list(output.shape)}")
    rows = output.T if output.shape[0] == channels else output  # -> [A, 4 + C]
    scores_all = rows[:, 4:]
    class_ids = scores_all.argmax(1)
    scores = scores_all[np.arange(len(rows)), class_ids]
    keep = scores > score_threshold
    cxcywh, scores, class_ids = rows[keep, :4].astype(np.float64), scores[keep], class_ids[keep]
    boxes = np.empty_like(cxcywh)
    boxes[:, :2] = cxcywh[:, :2] - cxcywh[:, 2:] / 2
    boxes[:, 2:] = cxcywh[:, :2] + cxcywh[:, 2:] / 2
    if not len(boxes):
        return boxes.reshape(0, 4), scores.astype(np.float64), class_ids.astype(np.int64)
    # Per-class NMS in one pass: shift each class's boxes to their own region of the plane.
    offset = 0.0 if class_agnostic else float(2 * np.abs(boxes).max() + 1)
    kept = nms(boxes + (class_ids * offset)[:, None], scores, iou_threshold, max_detections)
    return boxes[kept], scores[kept].astype(np.float64), class_ids[kept].astype(np.int64)


class OnnxDetector:
    """A configured detector: letterbox, onnxruntime, decode, NMS, boxes in original pixels."""

    def __init__(self, config: DetectorConfig, threads: int | None = None) -> None:
        self.config = config
        self.name = config.name
        self.classes = list(config.classes)
        if not config.onnx.is_file():
            raise DetectorError(f"detector {config.name!r}: ONNX file not found: {config.onnx}")
        try:
            self.session = make_session(config.onnx, threads)
        except RuntimeError as exc:
            raise DetectorError(f"detector {config.name!r}: {exc}") from None
        (inp,) = self.session.get_inputs()[:1]
        self.input_name = inp.name
        shape = list(inp.shape)
        static = len(shape) == 4 and all(isinstance(d, int) for d in shape[2:])
        if config.input_size is not None:
            self.input_size = tuple(config.input_size)
        elif static:
            self.input_size = (shape[2], shape[3])
        else:
            raise DetectorError(f"detector {config.name!r} has a dynamic input size {shape}; set 'input_size'")
        self.fixed_batch = shape[0] if shape and isinstance(shape[0], int) else None
        out_shape = list(self.session.get_outputs()[0].shape)
        channels = 4 + len(self.classes)
        if len(out_shape) == 3 and all(isinstance(d, int) for d in out_shape[1:]) and channels not in out_shape[1:]:
            raise DetectorError(
                f"detector {config.name!r}: output shape {out_shape} has no axis of 4 + {len(self.classes)} classes; "
                "check 'classes'"
            )

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Raw outputs for a letterboxed batch [N, 3, H, W] (one image at a time for fixed-batch models)."""
        if self.fixed_batch is None or self.fixed_batch == batch.shape[0]:
            return self.session.run(None, {self.input_name: batch})[0]
        return np.concatenate([self.session.run(None, {self.input_name: b[None]})[0] for b in batch])

    def detect(self, images: list[Image.Image]) -> list[list[Detection]]:
        """Boxes for each image, best score first, in that image's pixel coordinates."""
        boxed = [letterbox(img, self.input_size) for img in images]
        outputs = self.run(np.stack([x for x, _ in boxed]))
        cfg = self.config
        results = []
        for out, (_, lb) in zip(outputs, boxed, strict=True):
            boxes, scores, class_ids = decode_yolov8(
                out, len(self.classes), score_threshold=cfg.score_threshold, iou_threshold=cfg.iou_threshold,
                max_detections=cfg.max_detections, class_agnostic=cfg.class_agnostic,
            )
            mapped = unletterbox(boxes, lb)
            inside = (mapped[:, 2] > mapped[:, 0]) & (mapped[:, 3] > mapped[:, 1])  # not wholly in the padding
            results.append([
                Detection(tuple(float(v) for v in box), int(c), self.classes[int(c)], float(s))  # type: ignore[arg-type]
                for box, s, c in zip(mapped[inside], scores[inside], class_ids[inside], strict=True)
            ])
        return results
