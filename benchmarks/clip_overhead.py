"""Cost of CLIP-guided expert selection, and onnxruntime vs PyTorch for a frozen classifier.

    python -m benchmarks.clip_overhead [--threads 2] [--repeats 20] [--only clip|frozen] [--json out.json]

1. Selection overhead per image: a ViT-B/32-sized CLIP image tower (random weights: speed does not
   depend on the values) exported with the project's own exporter and loaded through the serving
   path (``ClipModel``), timed at batch 1 and 32 for CLIP's preprocessing, the image tower and the
   routing decision (cosines + softmax over 8 routes).
2. The frozen fast path: CIFAR ResNet-20 (shared checkpoint) in PyTorch vs the same model exported to
   ONNX and run by onnxruntime, batch 1 and 32.

Both runtimes are limited to ``--threads`` intra-op threads. Times are medians over ``--repeats``
runs after warm-up; PyTorch and onnxruntime are timed in turns, so other jobs' load hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds of each function, timed in turns so that load from other jobs hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def vit_b32_clip_dir(out: Path) -> Path:
    """Export a random ViT-B/32 CLIP image tower (768 wide, 12 layers, patch 32, 224 px, 512-d) to ``out``."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from service.clip.export import HFImageTower, write_clip_dir
    from service.clip.manifest import ImageSpec

    config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=32, projection_dim=512)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CLIPVisionModelWithProjection(config).eval()
    write_clip_dir(out, image_tower=HFImageTower(model).eval(), image=ImageSpec(), embed_dim=512,
                   logit_scale=float(np.log(100.0)), model_id="random ViT-B/32 (benchmark)", source="transformers")
    return out


def clip_overhead(threads: int, repeats: int, frost: Path | None) -> list[dict]:
    from service.clip.preprocess import clip_batch
    from service.clip.routing import Route, RouteTable
    from service.clip.towers import ClipModel

    with tempfile.TemporaryDirectory(prefix="clip-bench-") as tmp:
        clip = ClipModel(vit_b32_clip_dir(Path(tmp) / "clip"), threads=threads)
        if frost is not None and frost.is_file():
            image = Image.open(frost).convert("RGB")
        else:
            image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
        rng = np.random.default_rng(0)
        routes = [Route(f"r{i}", f"e{i}", ("p",)) for i in range(8)]
        emb = rng.normal(size=(8, 512)).astype(np.float32)
        table = RouteTable("bench", routes, emb / np.linalg.norm(emb, axis=1, keepdims=True), "e0", logit_scale=4.6)
        rows = []
        for batch in (1, 32):
            images = [image] * batch
            pixels = clip_batch(images, clip.manifest.image)
            embeddings = clip.embed_images(pixels)
            pre = median_seconds(lambda images=images: clip_batch(images, clip.manifest.image), repeats)
            tower = median_seconds(lambda pixels=pixels: clip.embed_images(pixels), repeats)
            decide = median_seconds(lambda embeddings=embeddings: table.decide(embeddings), repeats)
            rows.append({
                "batch": batch, "image": f"{image.width}x{image.height}",
                "preprocess_ms_per_image": 1000 * pre / batch,
                "tower_ms_per_image": 1000 * tower / batch,
                "decide_ms_per_image": 1000 * decide / batch,
                "total_ms_per_image": 1000 * (pre + tower + decide) / batch,
            })
    return rows


def frozen_classifier(threads: int, repeats: int, weights: Path) -> list[dict]:
    from adapters.models import build_cifar_resnet
    from service.onnx_classifier import OnnxModule, classifier_session, export_classifier

    model = build_cifar_resnet("resnet20", weights).eval()
    session = classifier_session(export_classifier(model, (32, 32)), threads)
    onnx_module = OnnxModule(session)
    rows = []
    for batch in (1, 32):
        x = torch.rand(batch, 3, 32, 32)
        with torch.no_grad():
            t = interleaved_medians({
                "torch": lambda x=x: model(x),
                "ort": lambda x=x: session.run(None, {"images": x.numpy()}),
                "wrapped": lambda x=x: onnx_module(x),
            }, repeats)
        torch_s, ort_s, wrapped_s = t["torch"], t["ort"], t["wrapped"]
        rows.append({
            "batch": batch,
            "torch_images_per_s": batch / torch_s, "onnxruntime_images_per_s": batch / ort_s,
            "onnx_module_images_per_s": batch / wrapped_s, "speedup": torch_s / ort_s,
            "torch_ms": 1000 * torch_s, "onnxruntime_ms": 1000 * ort_s,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--only", choices=("clip", "frozen"), default=None, help="run one of the two measurements")
    args = parser.parse_args()

    from benchmarks.data import checkpoint_path, shared_dir

    shared = shared_dir()

    torch.set_num_threads(args.threads)
    machine = {"cpus": os.cpu_count(), "threads": args.threads, "processor": platform.processor() or platform.machine(),
               "torch": torch.__version__, "load_before": os.getloadavg()[0]}
    import onnxruntime

    machine["onnxruntime"] = onnxruntime.__version__
    clip_rows, frozen_rows = [], []
    if args.only in (None, "clip"):
        photo = shared / "data" / "frost" / "frost1.png" if shared else None
        clip_rows = clip_overhead(args.threads, args.repeats, photo)
    if args.only in (None, "frozen"):
        frozen_rows = frozen_classifier(args.threads, args.repeats, checkpoint_path("resnet20"))
    machine["load_after"] = os.getloadavg()[0]

    print(f"machine: {machine}")
    print("\nCLIP selection overhead (ViT-B/32 image tower, onnxruntime), ms per image")
    print("| batch | preprocess | image tower | routing decision | total |")
    print("|---:|---:|---:|---:|---:|")
    for r in clip_rows:
        print(f"| {r['batch']} | {r['preprocess_ms_per_image']:.2f} | {r['tower_ms_per_image']:.1f} | "
              f"{r['decide_ms_per_image']:.3f} | {r['total_ms_per_image']:.1f} |")
    print("\nFrozen ResNet-20: PyTorch vs onnxruntime, images/s")
    print("| batch | PyTorch | onnxruntime | via OnnxModule (engine path) | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for r in frozen_rows:
        print(f"| {r['batch']} | {r['torch_images_per_s']:.0f} | {r['onnxruntime_images_per_s']:.0f} | "
              f"{r['onnx_module_images_per_s']:.0f} | {r['speedup']:.2f}x |")
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine, "clip": clip_rows, "frozen": frozen_rows}, indent=2))


if __name__ == "__main__":
    main()
