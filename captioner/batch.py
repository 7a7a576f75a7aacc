"""Caption a whole photo collection into one file.

    python -m captioner.batch SRC... --out captions.jsonl [--ray [ADDRESS]] [decoding and model flags]

SRC: image files, folders (searched recursively for image files), glob patterns ("photos/**/*.jpg",
quoted) or text files (.txt) of paths, one per line, relative to the text file's folder.
--out: .jsonl (one JSON object per line, as `captioner --json` prints), .csv or .parquet; every image
gets a record: its caption and the beam's candidates, or the sentence saying why it couldn't be read.

On one machine it is a pipeline: decode workers (sandbox.DecodePool: separate processes, each file
with a deadline) read and resize the next batches' files while the encoder and the decoder work on
the current one; the output is flushed after every batch. A rerun with the same --out skips the
images the output already holds, so an interrupted job goes on where it stopped. A bad file is
recorded with its error and never stops the job.

With --ray the same job runs on Ray Data: the file list becomes a dataset, and an actor pool of
captioners (by default one per machine; each loads the model once) reads and captions it in
`map_batches`; the driver writes the records as they come, in the same format, with the same
resuming. Without an ADDRESS it starts a local Ray on this machine; with one (or RAY_ADDRESS) it
joins that cluster, whose every node needs this package installed and the files at the same paths
(shared storage).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .cli import add_decoding_arguments, add_model_arguments, check_model_arguments, decoding_options
from .image import IMAGE_SUFFIXES, InvalidImageError, read_image_bytes

# Images per batch: each goes through the encoder in chunks of encoder.BATCH_SIZE and then through the
# decoder at once, where beam search amortises its per-step work over all the batch's beams.
BATCH_SIZE = 32
# Batches being read ahead of the one being captioned: enough to keep the decode workers busy while the
# encoder runs, few enough to bound memory (a batch of 224x224 pixels is 4.8 MB).
BATCHES_AHEAD = 2
# A batch job reads one's own files, often large photos, on a machine that is also encoding: a longer
# deadline per file than the app's (sandbox.DECODE_DEADLINE_S), still a bound for a file crafted to crawl.
DECODE_DEADLINE_S = 30.0
LIST_SUFFIX = ".txt"  # a SRC with this suffix is a file of paths, not an image
FORMATS = (".jsonl", ".csv", ".parquet")
# CSV and Parquet; JSON Lines as `captioner --json`. objects: the encoder's likeliest ImageNet classes (a JSON list in
# CSV); familiar: whether the photo is like the training photos (empty where the weights folder can't tell).
COLUMNS = ("image", "caption", "log_prob", "error", "candidates", "objects", "familiar", "familiarity")
# Batches an actor works on at once, in threads: one is read by its decode workers while the other is
# encoded and decoded (both release the GIL), the pipeline of the plain command inside each actor.
ACTOR_BATCHES_AT_ONCE = 2


# ---- what to caption -------------------------------------------------------------------------------


def list_images(sources: list[str]) -> list[str]:
    """SRC arguments -> image paths, in order, each once. Raises ValueError for a SRC that names nothing."""
    paths: list[str] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = _images_in_folder(path)
        elif path.is_file() and path.suffix.lower() == LIST_SUFFIX:
            found = _paths_in_list(path)
        elif path.is_file():
            found = [source]  # named explicitly: captioned (or its error recorded) whatever its suffix
        elif glob.has_magic(source):
            found = []
            for match in sorted(glob.glob(source, recursive=True)):
                if Path(match).is_dir():
                    found += _images_in_folder(Path(match))
                elif Path(match).suffix.lower() in IMAGE_SUFFIXES:
                    found.append(match)
        else:
            raise ValueError(f"{source} is not a file, a folder or a pattern that matches anything.")
        if not found and not path.is_file():
            raise ValueError(f"No image files ({', '.join(IMAGE_SUFFIXES)}) in {source}.")
        paths += found
    return list(dict.fromkeys(paths))


def _images_in_folder(folder: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):  # symbolic links to folders are not followed: no cycles
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files) if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return found


def _paths_in_list(list_file: Path) -> list[str]:
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"The list of paths {list_file} can't be read ({exc}).") from None
    base = list_file.parent
    return [line.strip() if Path(line.strip()).is_absolute() else str(base / line.strip()) for line in lines if line.strip()]


# ---- records and output files ----------------------------------------------------------------------


def caption_record(image: str, caption) -> dict:
    """The record of a captioned image: the same object `captioner --json` prints."""
    candidates = [{"caption": text, "log_prob": round(float(lp), 4)} for text, lp in caption.candidates]
    objects = [{"name": name, "probability": probability} for name, probability in caption.objects]
    return {"image": image, "caption": caption.text, "candidates": candidates, "objects": objects,
            "familiar": caption.familiar, "familiarity": caption.familiarity}


def error_record(image: str, message: str) -> dict:
    return {"image": image, "error": message}


def open_output(path: str | Path, overwrite: bool = False):
    """The output file for `path`'s format, with `.done`: the images it already holds."""
    path = Path(path)
    kinds = {".jsonl": JsonLinesOutput, ".csv": CsvOutput, ".parquet": ParquetOutput}
    if path.suffix.lower() not in kinds:
        raise ValueError(f"--out must end with {', '.join(FORMATS)}, not {path.name!r}.")
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder; name a file.")
    path.parent.mkdir(parents=True, exist_ok=True)
    return kinds[path.suffix.lower()](path, overwrite)


class JsonLinesOutput:
    """One JSON object per line, appended and flushed batch by batch."""

    def __init__(self, path: Path, overwrite: bool = False):
        self.path = path
        if overwrite:
            path.unlink(missing_ok=True)
        self.done: set[str] = set()
        if path.exists():
            _cut_unfinished_line(path)
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                    raise ValueError(f"{path} line {number} is not a record of this command; choose another --out "
                                     "or pass --overwrite.")
                self.done.add(record["image"])
        self._file = open(path, "a", encoding="utf-8")

    def write(self, records: list[dict]) -> None:
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class CsvOutput:
    """The COLUMNS, one row per image; candidates as a JSON list."""

    def __init__(self, path: Path, overwrite: bool = False):
        self.path = path
        if overwrite:
            path.unlink(missing_ok=True)
        self.done: set[str] = set()
        new = not path.exists() or path.stat().st_size == 0
        if not new:
            _cut_unfinished_line(path)
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if tuple(reader.fieldnames or ()) != COLUMNS:
                    raise ValueError(f"{path} has other columns than this command writes ({', '.join(COLUMNS)}); "
                                     "choose another --out or pass --overwrite.")
                self.done = {row["image"] for row in reader}
        self._file = open(path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(COLUMNS)

    def write(self, records: list[dict]) -> None:
        for r in records:
            best = r["candidates"][0]["log_prob"] if r.get("candidates") else ""
            candidates = json.dumps(r["candidates"], ensure_ascii=False) if "candidates" in r else ""
            objects = json.dumps(r["objects"], ensure_ascii=False) if "objects" in r else ""
            familiar = "" if r.get("familiar") is None else str(r["familiar"]).lower()
            familiarity = "" if r.get("familiarity") is None else r["familiarity"]
            self._writer.writerow([r["image"], r.get("caption", ""), best, r.get("error", ""), candidates, objects,
                                   familiar, familiarity])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class ParquetOutput:
    """A Parquet file can't be appended to: records go to a JSON Lines journal beside it while the job
    runs (that is what a rerun resumes from), and close() writes the Parquet file whole (atomically)."""

    def __init__(self, path: Path, overwrite: bool = False):
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise ValueError("Parquet output needs pyarrow: pip install pyarrow (or write .jsonl or .csv).") from None
        self.path = path
        self.journal = JsonLinesOutput(path.with_name(path.name + ".partial.jsonl"), overwrite)
        if overwrite:
            path.unlink(missing_ok=True)
        self.done = self._images_in_file() | self.journal.done

    def _images_in_file(self) -> set[str]:
        import pyarrow.parquet as pq

        if not self.path.exists():
            return set()
        try:
            return set(pq.read_table(self.path, columns=["image"]).column("image").to_pylist())
        except Exception as exc:  # not Parquet, or not ours
            raise ValueError(f"{self.path} can't be read as this command's Parquet output ({exc}); choose another "
                             "--out or pass --overwrite.") from None

    def write(self, records: list[dict]) -> None:
        self.journal.write(records)

    def close(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.journal.close()
        journal = [json.loads(line) for line in self.journal.path.read_text(encoding="utf-8").splitlines()]
        if not journal and self.path.exists():
            self.journal.path.unlink()
            return
        schema = pa.schema([
            ("image", pa.string()), ("caption", pa.string()), ("log_prob", pa.float64()), ("error", pa.string()),
            ("candidates", pa.list_(pa.struct([("caption", pa.string()), ("log_prob", pa.float64())]))),
            ("objects", pa.list_(pa.struct([("name", pa.string()), ("probability", pa.float64())]))),
            ("familiar", pa.bool_()), ("familiarity", pa.float64()),
        ])
        tables = [pq.read_table(self.path).cast(schema)] if self.path.exists() else []
        held = set(tables[0].column("image").to_pylist()) if tables else set()
        rows = [{"image": r["image"], "caption": r.get("caption"), "error": r.get("error"),
                 "log_prob": r["candidates"][0]["log_prob"] if r.get("candidates") else None,
                 "candidates": r.get("candidates", []), "objects": r.get("objects", []), "familiar": r.get("familiar"),
                 "familiarity": r.get("familiarity")}
                for r in journal if r["image"] not in held]  # a journal left by a run killed after its last write
        tables.append(pa.Table.from_pylist(rows, schema=schema))
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        pq.write_table(pa.concat_tables(tables), staging)
        os.replace(staging, self.path)
        self.journal.path.unlink()


def _cut_unfinished_line(path: Path) -> None:
    """Drop a last line without its newline: the record a killed run was writing."""
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


# ---- captioning --------------------------------------------------------------------------------------


def read_pixels(pool, path: str, size: tuple[int, int]) -> np.ndarray | str:
    """One file -> its (h, w, 3) uint8 pixels for the encoder, or the sentence saying why it can't be used."""
    try:
        return pool.prepare_pixels(read_image_bytes(path), size)
    except InvalidImageError as exc:
        return str(exc)


def caption_prepared(captioner, paths: list[str], prepared: list, options) -> list[dict]:
    """Files and what read_pixels gave for them -> their records: the good ones captioned in one batch."""
    return decode_prepared(captioner, paths, prepared, encode_prepared(captioner, prepared), options)


def encode_prepared(captioner, prepared: list):
    """What read_pixels gave for a batch's files -> the features of those it could read, in order (an ensemble's:
    one array per member); None when it could read none."""
    pixels = [p for p in prepared if not isinstance(p, str)]
    if not pixels:
        return None
    return captioner.encode_pixels(np.stack(pixels))


def decode_prepared(captioner, paths: list[str], prepared: list, features, options) -> list[dict]:
    """The batch's records: a caption for each file that could be read (from its features), else its error."""
    captions = iter(captioner.caption_features(features, options) if features is not None else [])
    return [error_record(path, p) if isinstance(p, str) else caption_record(path, next(captions))
            for path, p in zip(paths, prepared)]


class _Readers(ThreadPoolExecutor):
    """Threads that hand files to the decode workers; on the way out (an error, Ctrl-C), files not started are dropped."""

    def __exit__(self, *exc):
        self.shutdown(wait=True, cancel_futures=True)
        return False


def run_local(captioner, paths: list[str], output, options, batch_size: int = BATCH_SIZE, workers: int | None = None,
              progress=None) -> dict:
    """Caption `paths` into `output` on this machine. Returns counts."""
    from .sandbox import DecodePool

    workers = workers or os.cpu_count() or 1
    size = captioner.input_size  # builds (or loads the cached) encoder before the workers start reading
    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    counts = {"captioned": 0, "errors": 0}
    # Three stages at once: decode workers read batch i + 2 (and on), a thread runs the encoder on batch i + 1
    # (OpenVINO and TensorFlow release the GIL), and this thread decodes batch i and writes its records.
    with DecodePool(workers, deadline_s=DECODE_DEADLINE_S) as pool, _Readers(workers) as readers, \
            _Readers(1) as encoder:
        upcoming, reading, encoding = iter(batches), deque(), deque()

        def read_next_batch():
            batch = next(upcoming, None)
            if batch is not None:
                reading.append((batch, [readers.submit(read_pixels, pool, path, size) for path in batch]))

        def encode_when_read(futures):  # in the encoder thread
            prepared = [f.result() for f in futures]
            return prepared, encode_prepared(captioner, prepared)

        def encode_next_batch():
            if reading:
                batch, futures = reading.popleft()
                read_next_batch()
                encoding.append((batch, encoder.submit(encode_when_read, futures)))

        for _ in range(1 + BATCHES_AHEAD):
            read_next_batch()
        encode_next_batch()
        while encoding:
            batch, encoded = encoding.popleft()
            encode_next_batch()
            prepared, features = encoded.result()
            records = decode_prepared(captioner, batch, prepared, features, options)
            output.write(records)
            _count(counts, records, progress)
    return counts


def _count(counts: dict, records: list[dict], progress) -> None:
    errors = sum("error" in r for r in records)
    counts["errors"] += errors
    counts["captioned"] += len(records) - errors
    if progress is not None:
        progress.update(len(records))
        progress.set_postfix(errors=counts["errors"], refresh=False)


# ---- on Ray ----------------------------------------------------------------------------------------------


class RayCaptioner:
    """A Ray Data actor: loads the model once, then reads and captions batches of paths."""

    def __init__(self, source: str | None, revision: str | None, options: dict, workers: int):
        from .decoding import DecodingOptions, limit_blas_threads
        from .ensemble import load_model
        from .sandbox import DecodePool

        limit_blas_threads()
        self.captioner = load_model(source, revision)
        self.options = DecodingOptions(**options)
        self.size = self.captioner.input_size
        self.pool = DecodePool(workers, deadline_s=DECODE_DEADLINE_S)
        self.readers = _Readers(workers)

    def __call__(self, batch: dict) -> dict:
        paths = [str(p) for p in batch["image"]]
        prepared = list(self.readers.map(lambda path: read_pixels(self.pool, path, self.size), paths))
        records = caption_prepared(self.captioner, paths, prepared, self.options)
        return {"record": np.array([json.dumps(r, ensure_ascii=False) for r in records], dtype=object)}


def run_ray(address: str | None, source: str | None, revision: str | None, paths: list[str], output, options,
            batch_size: int = BATCH_SIZE, actors: int | None = None, workers: int | None = None, progress=None) -> dict:
    """Caption `paths` into `output` with Ray Data: an actor pool of RayCaptioners, records written by this driver."""
    import dataclasses
    import logging

    import ray
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its plan and progress notes: this command shows its own

    local = not (address or os.environ.get("RAY_ADDRESS"))
    # A local Ray on this machine: its CPUs, a small object store (batches of pixels never wait in it for
    # long), no dashboard. On a cluster: the cluster's own settings.
    init = dict(num_cpus=os.cpu_count(), object_store_memory=512 * 2**20, include_dashboard=False) if local else {}
    ray.init(address=address or None, log_to_driver=False, configure_logging=False, **init)
    try:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # records in the order of the file list, as without Ray
        context.enable_progress_bars = False  # this command's own bar counts images
        dataset = ray.data.from_items([{"image": p} for p in paths], override_num_blocks=max(1, len(paths) // batch_size))
        # By default one captioner per machine, with that machine's CPUs, as the plain command uses one.
        nodes = [node["Resources"]["CPU"] for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU")]
        actors = actors or len(nodes)
        cpus = max(1, min(min(nodes), sum(nodes) // actors))  # each actor's share
        captioned = dataset.map_batches(
            RayCaptioner,
            fn_constructor_kwargs=dict(source=source, revision=revision, options=dataclasses.asdict(options),
                                       workers=workers or int(cpus)),
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=ACTOR_BATCHES_AT_ONCE,
                                               max_concurrent_calls_per_actor=ACTOR_BATCHES_AT_ONCE,
                                               enable_true_multi_threading=True),
            num_cpus=cpus,
        )
        counts = {"captioned": 0, "errors": 0}
        for batch in captioned.iter_batches(batch_size=None, batch_format="numpy"):
            records = [json.loads(r) for r in batch["record"]]
            output.write(records)
            _count(counts, records, progress)
        return counts
    finally:
        ray.shutdown()


# ---- the command -------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m captioner.batch",
        description="Caption every image of folders, globs or lists of paths into one .jsonl, .csv or .parquet file; "
                    "a rerun skips the images the file already holds.",
    )
    parser.add_argument("sources", nargs="+", metavar="SRC", help="image files, folders, glob patterns, or .txt files of paths")
    parser.add_argument("--out", required=True, help="the output file: captions.jsonl, .csv or .parquet")
    parser.add_argument("--overwrite", action="store_true", help="start again: replace --out instead of resuming it")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images captioned together (default: %(default)s)")
    parser.add_argument("--workers", type=int,
                        help="processes decoding image files, per machine or Ray actor (default: one per CPU it has)")
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="run on Ray Data: on the cluster at ADDRESS (or $RAY_ADDRESS), else a local Ray on this machine")
    parser.add_argument("--ray-actors", type=int, help="captioners in the Ray actor pool, sharing the CPUs (default: one per machine)")
    add_decoding_arguments(parser)
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    check_model_arguments(parser, args)
    for name in ("batch_size", "workers", "ray_actors"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")

    try:
        options = decoding_options(args)  # bad flags fail before anything is loaded
        paths = list_images(args.sources)
        output = open_output(args.out, args.overwrite)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    todo = [p for p in paths if p not in output.done]
    skipped = len(paths) - len(todo)
    if skipped:
        print(f"{args.out} already holds {skipped} of the {len(paths)} images; captioning the other {len(todo)}.",
              file=sys.stderr)

    from tqdm import tqdm

    from . import WeightsError, load_model
    from .decoding import limit_blas_threads

    counts = {"captioned": 0, "errors": 0}
    try:
        if todo:
            limit_blas_threads()
            # Loaded here in both modes: a prompt's words are checked against the vocabulary before any work
            # (the encoder is built where images are encoded: here, or in each Ray actor).
            captioner = load_model(args.weights or args.repo, revision=args.revision)  # a Captioner, or an Ensemble
            options = captioner.decoding_options(options)
            if args.ray is None:
                captioner.warmup()  # the encoder: compiled, or loaded from the cache, before the clock starts
            started = time.perf_counter()
            with tqdm(total=len(todo), unit=" images", desc="captioning", file=sys.stderr, dynamic_ncols=True) as progress:
                if args.ray is None:
                    counts = run_local(captioner, todo, output, options, args.batch_size, args.workers, progress)
                else:
                    counts = run_ray(args.ray or None, args.weights or args.repo, args.revision, todo, output, options,
                                     args.batch_size, args.ray_actors, args.workers, progress)
    except (ValueError, WeightsError) as exc:
        parser.exit(2, f"error: {exc}\n")
    except KeyboardInterrupt:
        print(f"\nInterrupted. {args.out} holds what was done; run the same command again to go on.", file=sys.stderr)
        return 130
    finally:
        output.close()
    done = counts["captioned"] + counts["errors"]
    seconds = time.perf_counter() - started if done else 0.0
    rate = f" in {seconds:.1f} s ({done / seconds:.1f} images/s)" if done else ""
    where = f" (their errors are in {args.out})" if counts["errors"] else ""
    print(f"{counts['captioned']} captioned, {counts['errors']} could not be read{where}{rate}.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
