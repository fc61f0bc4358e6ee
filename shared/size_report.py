"""What a trained run costs to ship: parameters, multiply-adds, size on disk of each artifact format and
batch-1 CPU latency, saved in the run folder as size.json and size.md (`python -m shared.runner size`).
Any task that exports TFLite: a classification or a detection run (its TFLite file as the task exports it,
`Task.export_tflite`: for a detector the default form, post-processing included where the export has it)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

from shared import sizing, tflite
from shared.errors import UserError
from shared.durable import atomic_write
from shared.frozen import thaw
from shared.runs import Run
from shared.task import Task

FORMATS = ("keras", "saved_model", "tflite float32", "tflite float16", "tflite dynamic", "tflite int8")
TFLITE_MODES = {  # report format -> (quantize, io) of Task.export_tflite
    "tflite float32": ("none", "float"),
    "tflite float16": ("float16", "float"),
    "tflite dynamic": ("dynamic", "float"),
    "tflite int8": ("int8", "float"),
    "tflite int8 int8io": ("int8", "int8"),
}
MB = 1e6  # decimal megabytes, as file managers and papers quote sizes


def _bytes(path: Path) -> int:
    """Size of a file, or of everything under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _saved_model_bytes(model) -> int:
    """Export a SavedModel (`model.export`) to a temporary folder just to weigh it."""
    folder = Path(tempfile.mkdtemp(prefix="size-saved-model-"))
    try:
        model.export(str(folder / "model"), verbose=False)
        return _bytes(folder / "model")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def size_report(task: Task, model, run: Run, formats: Sequence[str] = FORMATS, latency_runs: int = 30) -> dict:
    """Measure the run's `model` (rebuilt from its last checkpoint by the command: `shared.tasks.rebuild`; `task`
    bound to the run's config) in each of `formats` (see FORMATS; also "tflite int8 int8io") and save the
    report as `<run>/size.json` and `<run>/size.md`; returns the report.

    Sizes: the .keras checkpoint (it includes the optimizer state), a SavedModel exported for sizing
    only, and each TFLite variant written by `Task.export_tflite` into `<run>/export/`. Latency:
    batch 1, median of `latency_runs` calls, for the Keras model (TensorFlow's thread pool) and for
    each TFLite variant (LiteRT, one thread, measured in interleaved rounds); the SavedModel has none."""
    unknown = [name for name in formats if name not in ("keras", "saved_model", *TFLITE_MODES)]
    if unknown:
        raise UserError(f"unknown size-report format(s) {', '.join(map(repr, unknown))}; "
                        f"choose from {', '.join(['keras', 'saved_model', *TFLITE_MODES])}")
    config = task.config
    data = config.data
    input_shape = (data.image_size, data.image_size, data.channels)
    entries: dict[str, dict] = {}
    tflite_paths: dict[str, Path] = {}
    for name in formats:
        if name == "keras":
            checkpoint = run.last_checkpoint()
            entries[name] = {"path": str(checkpoint.relative_to(run.path)), "bytes": _bytes(checkpoint),
                             "latency_ms": tflite.keras_latency_ms(model, input_shape, runs=latency_runs),
                             "note": "checkpoint: weights + optimizer state"}
        elif name == "saved_model":
            entries[name] = {"path": None, "bytes": _saved_model_bytes(model), "latency_ms": None,
                             "note": "model.export() to a temporary folder, for sizing only"}
        else:
            quantize, io = TFLITE_MODES[name]
            try:
                path, beside = task.export_tflite(model, run, quantize, io)
            except UserError as error:  # e.g. ops without int8 kernels: report it, measure the rest
                entries[name] = {"path": None, "bytes": None, "latency_ms": None, "error": str(error)}
                continue
            tflite_paths[name] = path
            entries[name] = {"path": str(path.relative_to(run.path)), "bytes": _bytes(path), "latency_ms": None}
            if beside:
                entries[name]["note"] = beside
    if tflite_paths:
        rounds = 3
        medians = tflite.interleaved_latency_ms(list(tflite_paths.values()), rounds=rounds,
                                                runs=max(1, -(-latency_runs // rounds)))
        for name, median in zip(tflite_paths, medians):
            entries[name]["latency_ms"] = median
    for entry in entries.values():
        entry["size_mb"] = None if entry["bytes"] is None else entry["bytes"] / MB

    report = {
        "run": str(run.path), "task": task.name, "model": config.model.name, "hparams": thaw(config.model.hparams),
        "input_shape": list(input_shape),
        "trainable_parameters": sizing.trainable_parameters(model),
        "non_trainable_parameters": int(sum(int(w.numpy().size) for w in model.non_trainable_weights)),
        "multiply_adds": sizing.multiply_adds(model),
        "formats": entries,
        "latency": {"batch": 1, "statistic": "median", "runs": latency_runs, "litert_threads": 1,
                    "keras_threads": "TensorFlow default (all cores)", "cpu_count": os.cpu_count(),
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    run.write_json("size.json", report)
    atomic_write(run.path / "size.md", format_table(report))
    return report


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(report: dict) -> str:
    """The report as Markdown: a header with parameters and multiply-adds, then one row per format."""
    shape = "x".join(map(str, report["input_shape"]))
    latency = report["latency"]
    lines = [
        f"# Size of {report['model']} ({report['run']})", "",
        f"- trainable parameters: {report['trainable_parameters']:,}",
        f"- non-trainable parameters: {report['non_trainable_parameters']:,}",
        f"- multiply-adds per image at {shape}: {report['multiply_adds']:,} "
        f"({report['multiply_adds'] / 1e6:.2f} M)",
        f"- latency: batch 1, {latency['statistic']} of {latency['runs']} runs on the CPU; LiteRT on "
        f"{latency['litert_threads']} thread, Keras on {latency['keras_threads']}; load average at the time "
        f"{json.dumps([round(x, 2) for x in latency['load_average']]) if latency.get('load_average') else '-'}",
        "",
        "| format | size (MB) | size vs tflite float32 | latency (ms) | file |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    # Not relative to the .keras checkpoint: that one also carries the optimizer state.
    base = report["formats"].get("tflite float32", {}).get("bytes")
    for name, entry in report["formats"].items():
        ratio = f"{entry['bytes'] / base:.2f}" if base and entry.get("bytes") else "-"
        where = entry.get("path") or entry.get("error") or entry.get("note") or "-"
        lines.append(f"| {name} | {_number(entry.get('size_mb'), 3)} | {ratio} | "
                     f"{_number(entry.get('latency_ms'), 3)} | {where} |")
    return "\n".join(lines) + "\n"
