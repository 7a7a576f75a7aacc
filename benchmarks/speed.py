"""How fast is the captioner on this machine? One table, and the same figures in one JSON file.

    python -m benchmarks.speed [--weights weights] [--images examples] [--collection DIR] [--collection-size 1024]
                               [--repeats 5] [--ensemble DIR|none] [--skip-ray] [--skip-cold-start]
                               [--json benchmarks/results/speed.json]

Medians of repeated runs after warm-up, on the same images; comparisons are measured in the same run,
interleaved where they share a line, so background load hits both sides alike:

  encoder      encode_pixels() on prepared uint8 pixels, ms per image at batch 1 and 8: TensorFlow, OpenVINO float32
               (the Keras encoder converted at load: the code before issue 19), and the weights folder's own
               OpenVINO model (encoder.xml: int8 for the bundled folder; one image with its preprocessing inside
               it), interleaved; and, for the folder's model and float32's both compiled as that one-image model,
               the time inside their layers by OpenVINO's per-layer counters (what bounds the int8 model's gain)
  decoding     caption_features() from one image's features, ms per caption: greedy, beam 3, 5, 10; with the
               folder's int8 step (decoder.onnx) and with NumPy's float32 step (before), interleaved
  caption()    an image file to its caption (greedy; beam 5 with the recommended length penalty), p50 and
               p95, next to encode() of the same file; with the folder's encoder and decoder step, and with
               float32's ("before": the encoder converted from Keras at load, NumPy's step)
  page default --ensemble's caption() (the page's default, the Lite0 + Lite1 ensemble, when --weights is the bundled
               folder) from the image file, greedy and beam 5, p50 and p95, interleaved with the model's own caption()
  batch        the batch command's pipeline (captioner.batch.run_local: decode workers, encoder, decoder)
               over --collection's JPEG files, images/s once running (over the second half of its batches),
               next to the encoder alone on the same images' already decoded pixels; likewise both encoders,
               in turn, BATCH_ROUNDS times (medians)
  ray          the same job on a local Ray (captioner.batch.run_ray): images/s once running (likewise), the
               whole job's wall time (Ray's start and the actors' model loading included), same records or not
  cold start   a new process, timed from outside: interpreter, import, load, first caption; with the
               OpenVINO cache filled (as after the first run), empty (TensorFlow and Keras made unimportable:
               the folder's encoder.xml), empty without the folder's encoder.xml (converted from Keras, as
               before), and on TensorFlow; and the largest peak memory (RSS) of those processes
  install      with --install-size: `pip install -r requirements.txt` into a fresh venv (no pip cache), its
               size and time (minutes; needs PyPI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FLICKR8K_IMAGES = ROOT.parent / "shared" / "flickr8k" / "images"
# The batch command and its "before" run in turn this many times, medians kept: one pass of each moved their ratio
# between 1.5x and 1.8x from run to run.
BATCH_ROUNDS = 3
COLD_START = ("import sys; from captioner import Captioner; "
              "print(Captioner.from_pretrained(sys.argv[1]).caption(sys.argv[2]).text)")


def seconds(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def ms(values) -> float:
    return round(1000 * float(np.median(values)), 3)


def p95_ms(values) -> float:
    return round(1000 * float(np.percentile(values, 95)), 3)


class Clock:
    """A progress stand-in for the batch runs: when each batch was written, to time the steady state."""

    def __init__(self):
        self.marks: list[tuple[float, int]] = []

    def update(self, images: int) -> None:
        self.marks.append((time.perf_counter(), images))

    def set_postfix(self, **_) -> None:
        pass

    def images_per_s(self) -> float | None:
        """The rate over the second half of the batches: the pipeline running, start-up over (Ray's results may
        come in a burst after it)."""
        if len(self.marks) < 2:
            return None
        start = len(self.marks) // 2 if len(self.marks) > 2 else 0
        return sum(n for _, n in self.marks[start + 1 :]) / (self.marks[-1][0] - self.marks[start][0])


def measure_encoders(cap, pixels: np.ndarray, repeats: int) -> dict:
    from captioner.encoder import ImageEncoder

    encoders = {name: ImageEncoder(cap.config.encoder, cap.encoder_weights, backend=name) for name in ("tensorflow", "openvino")}
    if cap.weights is not None and cap.weights.encoder_ir is not None:
        encoders["folder"] = cap.encoder  # the folder's own OpenVINO model: what serving runs
    batch = np.resize(pixels, (8, *pixels.shape[1:]))
    samples = {(name, size): [] for name in encoders for size in (1, 8)}
    for encoder in encoders.values():
        encoder.encode_pixels(batch[:1]), encoder.encode_pixels(batch)  # warm-up: the first calls compile
    for _ in range(repeats):
        for i in range(len(pixels)):
            for name, encoder in encoders.items():
                samples[name, 1].append(seconds(encoder.encode_pixels, pixels[i : i + 1]))
        for name, encoder in encoders.items():
            samples[name, 8].append(seconds(encoder.encode_pixels, batch) / 8)
    result = {f"{name}_batch{size}_ms": ms(values) for (name, size), values in samples.items()}
    if "folder" in encoders:
        result.update(measure_encoder_layers(cap, pixels, repeats))
    return result


# OpenVINO's layer types, as the encoder layers figures group them (EfficientNet-Lite: the stem and the 1x1
# convolutions are Convolution, the depthwise ones GroupConvolution; the rest is pooling, padding and reorders).
LAYER_KINDS = {"Convolution": "convolution", "GroupConvolution": "depthwise"}


def measure_encoder_layers(cap, pixels: np.ndarray, repeats: int) -> dict:
    """What bounds the folder's encoder.xml against float32: the time inside the network's layers, by OpenVINO's
    per-layer counters, of each as serving compiles one image (backends.one_image_model: batch 1, uint8 pixels,
    the preprocessing inside), the float32 model converted from Keras as serving converted it before issue 19.
    ms per image (medians, interleaved): all layers, and the convolutions and depthwise convolutions among them."""
    from collections import defaultdict

    from captioner import backends

    ov = backends.import_openvino()
    core, config = ov.Core(), {**backends.OPENVINO_CONFIG, "PERF_COUNT": "YES"}
    models = {"openvino": backends._convert(backends._with_pooling(cap.encoder.feature_map_model)),
              "folder": core.read_model(str(cap.weights.encoder_ir))}
    requests = {name: core.compile_model(backends.one_image_model(model, cap.encoder.spec.pixel_normalization), "CPU",
                                         config).create_infer_request() for name, model in models.items()}
    samples = defaultdict(list)
    for request in requests.values():
        request.infer([pixels[:1]])  # warm-up
    for _ in range(repeats):
        for i in range(len(pixels)):
            for name, request in requests.items():
                request.infer([pixels[i : i + 1]])
                kinds = defaultdict(float)
                for layer in request.profiling_info:
                    kinds[LAYER_KINDS.get(layer.node_type, "other")] += layer.real_time.total_seconds()
                samples[f"{name}_layers_ms"].append(sum(kinds.values()))
                for kind in LAYER_KINDS.values():
                    samples[f"{name}_{kind}_ms"].append(kinds[kind])
    return {key: ms(values) for key, values in samples.items()}


def measure_decoding(cap, features: np.ndarray, repeats: int, before=None) -> dict:
    settings = {"greedy": dict(method="greedy"), "beam3": dict(beam_width=3), "beam5": {}, "beam10": dict(beam_width=10)}
    options = {name: cap.decoding_options(**overrides) for name, overrides in settings.items()}
    captioners = {"": cap, **({"before_": before} if before is not None else {})}
    samples = {(label, name): [] for label in captioners for name in settings}
    for name in settings:
        for captioner in captioners.values():
            captioner.caption_features(features[:1], options[name])
    for _ in range(repeats):
        for i in range(len(features)):
            for name in settings:
                for label, captioner in captioners.items():
                    samples[label, name].append(seconds(captioner.caption_features, features[i : i + 1], options[name]))
    result = {f"{label}{name}_ms": ms(values) for (label, name), values in samples.items()}
    if before is not None:
        result.update({f"{name}_vs_before": round(result[f"{name}_ms"] / result[f"before_{name}_ms"], 3) for name in settings})
    return result


def float32_twin(cap):
    """The same captioner as before issue 19: the float32 encoder converted from Keras at load time, and NumPy's
    float32 decoder step; None when the folder has neither an encoder.xml nor a decoder.onnx (then cap is that)."""
    import copy

    from captioner.encoder import ImageEncoder
    from captioner.model import Int8StepModel

    if cap.weights is None or (cap.weights.encoder_ir is None and cap.weights.decoder_step is None):
        return None
    twin = copy.copy(cap)
    twin.__dict__["encoder"] = ImageEncoder(cap.config.encoder, cap.encoder_weights, backend="openvino")
    if isinstance(cap.step_model, Int8StepModel):
        twin.step_model = cap.step_model.float32()
        twin.__dict__.pop("naming", None)  # grown again from the float32 step
    return twin


def page_default_folder(weights: Path) -> Path | None:
    """The page's default ensemble when `weights` is the bundled folder and the checkout has the ensemble
    (webapp.models.page_models), else None."""
    from captioner.ensemble import is_ensemble_folder
    from captioner.weights import BUNDLED_WEIGHTS
    from webapp.models import BUNDLED_LITE1_ENSEMBLE

    bundled = Path(weights).resolve() == BUNDLED_WEIGHTS.resolve()
    return BUNDLED_LITE1_ENSEMBLE if bundled and is_ensemble_folder(BUNDLED_LITE1_ENSEMBLE) else None


def interleaved_percentiles(runs: dict, images: list[Path], repeats: int) -> dict:
    """Each run (a function of one image) on every image, `repeats` passes, the runs in turn for each image after one
    warm-up call each -> "<name>_p50_ms" and "<name>_p95_ms" for every run."""
    samples = {name: [] for name in runs}
    for run in runs.values():
        run(images[0])
    for _ in range(repeats):
        for image in images:
            for name, run in runs.items():
                samples[name].append(seconds(run, image))
    result = {f"{name}_p50_ms": ms(values) for name, values in samples.items()}
    result.update({f"{name}_p95_ms": p95_ms(values) for name, values in samples.items()})
    return result


def measure_caption(cap, images: list[Path], repeats: int, before=None) -> dict:
    runs = {"encode": lambda image: cap.encode([image]), "greedy": lambda image: cap.caption(image, method="greedy"),
            "beam5": lambda image: cap.caption(image)}
    if before is not None:  # interleaved with the same calls on the float32 encoder
        runs.update({"before_encode": lambda image: before.encode([image]),
                     "before_greedy": lambda image: before.caption(image, method="greedy"),
                     "before_beam5": lambda image: before.caption(image)})
    result = interleaved_percentiles(runs, images, repeats)
    for name in ("greedy", "beam5"):
        result[f"{name}_vs_encode"] = round(result[f"{name}_p50_ms"] / result["encode_p50_ms"], 3)
        if before is not None:
            result[f"{name}_vs_before"] = round(result[f"{name}_p50_ms"] / result[f"before_{name}_p50_ms"], 3)
    return result


def measure_ensemble_caption(cap, ensemble, images: list[Path], repeats: int) -> dict:
    """The ensemble's caption() of each image file (greedy, beam 5) against the model's own, interleaved call by call."""
    runs = {"greedy": lambda image: ensemble.caption(image, method="greedy"), "beam5": lambda image: ensemble.caption(image),
            "alone_greedy": lambda image: cap.caption(image, method="greedy"), "alone_beam5": lambda image: cap.caption(image)}
    result = interleaved_percentiles(runs, images, repeats)
    for name in ("greedy", "beam5"):
        result[f"{name}_vs_alone"] = round(result[f"{name}_p50_ms"] / result[f"alone_{name}_p50_ms"], 3)
    return result


def measure_batch(cap, weights: Path, paths: list[str], skip_ray: bool, before=None) -> dict:
    from captioner import batch
    from captioner.encoder import BATCH_SIZE
    from captioner.image import prepare_pixels

    options = cap.decoding_options()
    size = cap.encoder.input_size
    pixels = np.stack([prepare_pixels(path, size) for path in paths])  # decoded before the clock starts
    cap.encoder.encode_pixels(pixels[:BATCH_SIZE])
    encoder_s = seconds(lambda: [cap.encoder.encode_pixels(pixels[i : i + BATCH_SIZE])
                                 for i in range(0, len(pixels), BATCH_SIZE)])
    result = {"images": len(paths), "encoder_alone_images_per_s": round(len(paths) / encoder_s, 2)}
    with tempfile.TemporaryDirectory(prefix="speed_batch_") as folder:
        runs = {"batch": lambda output, clock: batch.run_local(cap, paths, output, options, progress=clock)}
        if before is not None:
            before.encoder.encode_pixels(pixels[:BATCH_SIZE])
            runs["before_batch"] = lambda output, clock: batch.run_local(before, paths, output, options, progress=clock)
        if not skip_ray:
            runs["ray"] = lambda output, clock: batch.run_ray(None, str(weights), None, paths, output, options, progress=clock)
        records, rates, walls = {}, {name: [] for name in runs}, {name: [] for name in runs}
        for round_ in range(BATCH_ROUNDS):
            for name, run in runs.items():
                if name == "ray" and round_:  # Ray's start-up dominates its wall time: once is enough
                    continue
                output, clock = batch.open_output(Path(folder) / f"{name}.jsonl"), Clock()
                walls[name].append(seconds(run, output, clock))
                output.close()
                records[name] = (Path(folder) / f"{name}.jsonl").read_text()
                if rate := clock.images_per_s():
                    rates[name].append(rate)
        for name in runs:
            result[f"{name}_images_per_s"] = round(float(np.median(rates[name])), 2) if rates[name] else None
            result[f"{name}_wall_s"] = round(float(np.median(walls[name])), 2)
    result["batch_vs_encoder"] = round(result["batch_images_per_s"] / result["encoder_alone_images_per_s"], 3)
    if before is not None:
        result["batch_vs_before"] = round(result["batch_images_per_s"] / result["before_batch_images_per_s"], 3)
    if not skip_ray:
        result["ray_vs_batch"] = round(result["ray_images_per_s"] / result["batch_images_per_s"], 3)
        result["ray_same_records"] = records["ray"] == records["batch"]
    return result


def measure_cold_start(weights: Path, image: Path) -> dict:
    """Wall clock of new processes from start to exit after their first caption."""
    from captioner.weights import read_folder

    result = {}
    with tempfile.TemporaryDirectory(prefix="speed_cache_") as scratch:
        scratch = Path(scratch)
        (scratch / "blocker").mkdir()  # its sitecustomize makes TensorFlow and Keras unimportable, as if not installed
        (scratch / "blocker" / "sitecustomize.py").write_text('import sys\nsys.modules["tensorflow"] = sys.modules["keras"] = None\n')
        no_tf = {"PYTHONPATH": os.pathsep.join([str(scratch / "blocker"), str(ROOT)])}
        has_ir = read_folder(weights).encoder_ir is not None  # (without it, the first start needs Keras to convert)
        variants = {"openvino_cached": (weights, {}),
                    "openvino_empty_cache": (weights, {"CAPTIONER_CACHE": str(scratch / "c1"), **(no_tf if has_ir else {})}),
                    "tensorflow": (weights, {"CAPTIONER_BACKEND": "tensorflow"})}
        if has_ir:  # before: the same folder without it, converted from Keras
            from training.export_encoder import without_openvino_model

            variants["converted_empty_cache"] = (without_openvino_model(weights, scratch / "w"), {"CAPTIONER_CACHE": str(scratch / "c2")})
        for name, (folder, env) in variants.items():
            command = [sys.executable, "-c", COLD_START, str(folder), str(image)]
            result[f"{name}_s"] = round(seconds(subprocess.run, command, cwd=ROOT, env={**os.environ, **env}, check=True,
                                                capture_output=True, timeout=600), 2)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)  # KB on Linux
    return result


def measure_install() -> dict:
    """`pip install -r requirements.txt` into a fresh venv, without pip's cache (downloads included)."""
    with tempfile.TemporaryDirectory(prefix="speed_venv_") as folder:
        subprocess.run([sys.executable, "-m", "venv", folder], check=True)
        wall = seconds(subprocess.run, [f"{folder}/bin/pip", "install", "--quiet", "--no-cache-dir", "--disable-pip-version-check",
                                        "-r", str(ROOT / "requirements.txt")], check=True, timeout=3600)
        size = sum(p.lstat().st_size for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink())
        has_tf = any(Path(folder).glob("lib/python*/site-packages/tensorflow"))
    return {"seconds": round(wall, 1), "size_mb": round(size / 2**20), "tensorflow_installed": has_tf}


def table(results: dict) -> str:
    e, d, c, b, s = (results.get(k) or {} for k in ("encoder", "decoding", "caption", "batch", "cold_start"))
    rows = [
        ("encoder, batch 1 (ms/image): TensorFlow / OpenVINO", f"{e['tensorflow_batch1_ms']:.1f} / {e['openvino_batch1_ms']:.1f}",
         f"OpenVINO {e['tensorflow_batch1_ms'] / e['openvino_batch1_ms']:.2f}x faster"),
        ("encoder, batch 8 (ms/image): TensorFlow / OpenVINO", f"{e['tensorflow_batch8_ms']:.1f} / {e['openvino_batch8_ms']:.1f}",
         f"OpenVINO {e['tensorflow_batch8_ms'] / e['openvino_batch8_ms']:.2f}x faster"),
        ("decoding from features (ms/caption): greedy / beam 3 / 5 / 10",
         " / ".join(f"{d[k]:.2f}" for k in ("greedy_ms", "beam3_ms", "beam5_ms", "beam10_ms")),
         "batch 1" + ("; now " + " / ".join(f"{d[f'{k}_vs_before']:.2f}x" for k in ("greedy", "beam3", "beam5", "beam10"))
                      if "greedy_vs_before" in d else "")),
        *((f"caption() {label}, p50 (p95) ms", f"{c[f'{key}_p50_ms']:.1f} ({c[f'{key}_p95_ms']:.1f})",
           f"{c[f'{key}_vs_encode']:.2f}x encode()") for label, key in (("greedy", "greedy"), ("beam 5", "beam5"))),
        ("encode() alone of the same file, p50 (p95) ms", f"{c['encode_p50_ms']:.1f} ({c['encode_p95_ms']:.1f})", ""),
    ]
    if "folder_batch1_ms" in e:
        rows[2:2] = [(f"encoder, batch {n} (ms/image): OpenVINO float32 / the folder's encoder.xml",
                      f"{e[f'openvino_batch{n}_ms']:.2f} / {e[f'folder_batch{n}_ms']:.2f}",
                      f"{e[f'openvino_batch{n}_ms'] / e[f'folder_batch{n}_ms']:.2f}x faster") for n in (1, 8)]
        rows.insert(4, ("encoder's layers alone, batch 1 (ms/image, OpenVINO's counters): float32 / encoder.xml",
                        f"{e['openvino_layers_ms']:.2f} / {e['folder_layers_ms']:.2f}",
                        (f"{e['openvino_layers_ms'] / e['folder_layers_ms']:.2f}x faster; convolutions "
                         f"{e['openvino_convolution_ms'] / e['folder_convolution_ms']:.2f}x, depthwise "
                         f"{e['openvino_depthwise_ms'] / e['folder_depthwise_ms']:.2f}x")))
    if "before_greedy_ms" in d:
        rows.insert(rows.index(next(r for r in rows if r[0].startswith("decoding from features"))) + 1,
                    ("before (NumPy's float32 step): decoding from features (ms/caption)",
                     " / ".join(f"{d[f'before_{k}_ms']:.2f}" for k in ("greedy", "beam3", "beam5", "beam10")), ""))
    if "before_beam5_p50_ms" in c:
        rows += [(f"before (float32 encoder and step): caption() {label}, p50 (p95) ms",
                  f"{c[f'before_{key}_p50_ms']:.1f} ({c[f'before_{key}_p95_ms']:.1f})",
                  f"now {c[f'{key}_vs_before']:.2f}x") for label, key in (("greedy", "greedy"), ("beam 5", "beam5"))]
    p = results.get("page_default") or {}
    if p:
        rows += [(f"the page's default ({p['folder']}): caption() {label}, p50 (p95) ms",
                  f"{p[f'{key}_p50_ms']:.1f} ({p[f'{key}_p95_ms']:.1f})",
                  f"{p[f'{key}_vs_alone']:.2f}x the model alone ({p[f'alone_{key}_p50_ms']:.1f} ms)")
                 for label, key in (("greedy", "greedy"), ("beam 5", "beam5"))]
    if b:
        rows += [
            (f"batch command, {b['images']} JPEG files (images/s)", f"{b['batch_images_per_s']:.1f}",
             f"{b['batch_vs_encoder']:.2f}x the encoder alone"),
            ("encoder alone on their decoded pixels (images/s)", f"{b['encoder_alone_images_per_s']:.1f}", ""),
        ]
        if "before_batch_images_per_s" in b:
            rows.append(("before (float32 encoder and step): batch command (images/s)", f"{b['before_batch_images_per_s']:.1f}",
                         f"now {b['batch_vs_before']:.2f}x"))
        if "ray_images_per_s" in b:
            rows.append(("Ray Data, local (images/s; whole job s)", f"{b['ray_images_per_s']:.1f}; {b['ray_wall_s']:.0f} s",
                         f"{b['ray_vs_batch']:.2f}x the batch command; same records: {'yes' if b['ray_same_records'] else 'NO'}"))
    if s:
        rows += [
            ("cold start to first caption (s): OpenVINO cached / empty cache / TensorFlow",
             f"{s['openvino_cached_s']:.1f} / {s['openvino_empty_cache_s']:.1f} / {s['tensorflow_s']:.1f}",
             "a new process, wall clock"),
            ("peak memory of those processes (MB)", f"{s['peak_rss_mb']:.0f}", ""),
        ]
        if "converted_empty_cache_s" in s:
            rows[-2] = (rows[-2][0].replace("empty cache", "empty cache (no TensorFlow)"), rows[-2][1],
                        f"before (converted from Keras, empty cache): {s['converted_empty_cache_s']:.1f} s")
    i = results.get("install") or {}
    if i:
        rows.append(("pip install -r requirements.txt, fresh venv (MB; s, no pip cache)", f"{i['size_mb']}; {i['seconds']:.0f} s",
                     f"TensorFlow installed: {'yes' if i['tensorflow_installed'] else 'no'}"))
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    line = lambda cells: "| " + " | ".join(f"{cell:<{w}}" for cell, w in zip(cells, width)) + " |"  # noqa: E731
    return "\n".join([line(("", "measured", "compared")), line(["-" * w for w in width]), *map(line, rows)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=ROOT / "weights", help="weights folder (default: weights/)")
    parser.add_argument("--images", nargs="+", default=[str(ROOT / "examples")],
                        help="photos or folders for the per-image figures (default: examples/)")
    parser.add_argument("--collection", type=Path, default=FLICKR8K_IMAGES if FLICKR8K_IMAGES.is_dir() else ROOT / "examples",
                        help="folder of JPEG files for the batch and Ray figures (default: Flickr8k's, else --images)")
    parser.add_argument("--collection-size", type=int, default=1024,
                        help="files of --collection to caption, cycled if it has fewer (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over --images (default: %(default)s)")
    parser.add_argument("--ensemble", default=None,
                        help="an ensemble's folder whose caption() to time beside the model's: 'none' for none (default: "
                             "weights/ensemble-lite1, the page's default, when --weights is the bundled folder)")
    parser.add_argument("--skip-batch", action="store_true", help="no batch command or Ray figures")
    parser.add_argument("--skip-ray", action="store_true", help="no Ray figures")
    parser.add_argument("--skip-cold-start", action="store_true", help="no new processes")
    parser.add_argument("--install-size", action="store_true", help="also time a fresh venv's install (minutes; PyPI)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "speed.json",
                        help="where to write the figures (default: benchmarks/results/speed.json)")
    args = parser.parse_args(argv)

    from captioner import Captioner
    from captioner.batch import list_images
    from captioner.decoding import limit_blas_threads

    limit_blas_threads()
    started, load = datetime.now(timezone.utc), os.getloadavg()
    images = [Path(p) for p in list_images(args.images)]
    cap = Captioner.from_pretrained(args.weights)
    results = {"meta": {
        "started": started.isoformat(timespec="seconds"), "weights": str(args.weights), "encoder": cap.config.encoder,
        "images": len(images), "repeats": args.repeats, "cpus": os.cpu_count(), "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(), "loadavg_start": [round(x, 2) for x in load],
    }}
    print(f"encoders on {len(images)} images ...", file=sys.stderr)
    results["encoder"] = measure_encoders(cap, cap.prepare_pixels(images), args.repeats)  # uint8, as the app's
    before = float32_twin(cap)
    print("decoding ...", file=sys.stderr)
    results["decoding"] = measure_decoding(cap, cap.encode(images), args.repeats, before)
    print("caption() ...", file=sys.stderr)
    results["caption"] = measure_caption(cap, images, args.repeats, before)
    ensemble_folder = page_default_folder(args.weights) if args.ensemble is None else args.ensemble
    if ensemble_folder not in (None, "none"):
        from captioner import Ensemble

        print("the page's default ...", file=sys.stderr)
        ensemble = Ensemble.from_folder(ensemble_folder, members={args.weights: cap})  # its Lite0 is `cap`, not loaded twice
        shown = Path(ensemble_folder).resolve()
        shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else ensemble_folder  # as the README names it
        results["page_default"] = {"folder": str(shown),
                                   **measure_ensemble_caption(cap, ensemble, images, args.repeats)}
    if not args.skip_batch:
        collection = list_images([str(args.collection)])
        paths = [collection[i % len(collection)] for i in range(args.collection_size)]
        print(f"batch command{'' if args.skip_ray else ' and Ray'} on {len(paths)} files ...", file=sys.stderr)
        results["batch"] = measure_batch(cap, args.weights, paths, args.skip_ray, before)
    if not args.skip_cold_start:
        print("cold starts ...", file=sys.stderr)
        results["cold_start"] = measure_cold_start(args.weights, images[0])
    if args.install_size:
        print("a fresh install ...", file=sys.stderr)
        results["install"] = measure_install()
    results["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nWrote {args.json}; load average {results['meta']['loadavg_start']} -> {results['meta']['loadavg_end']}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
