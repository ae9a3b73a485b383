"""Preparation benchmark: wall time, clips/s and CPU ms per clip of a whole `python -m data_pipelines.prepare` run
with the multiprocessing runner and with the Apache Beam runner (DirectRunner by default) on the same clips, and
whether the two wrote the same dataset.

The data is the synthetic Clotho-layout dataset (data_pipelines.synthetic) of --clips clips of --duration_s (all but
two in development, one each in validation and evaluation), generated once into --cache_dir. Each run prepares it
into a fresh output folder, so with a cold feature cache; the CPU time is that of the prepare process and of all
its child processes (what they used up to their exit, as the kernel reports it to the waiting parent).

"same dataset" compares every file of the two prepared folders (the feature cache aside) byte for byte, except the
records, which are compared as the same examples in the same order in the same shard files: TFDS serializes each
`tf.train.Example` with `SerializeToString()`, whose order of the feature map under protobuf's upb backend changes
from one process to the next, so two runs of the same runner in two processes give different bytes for equal
examples. Each record is therefore compared re-serialized with `deterministic=True`.

python -m scripts.benchmark_prepare [--clips=1000] [--duration_s=10] [--workers=N]
    [--beam_pipeline_options="runner=DirectRunner,..."]
"""

import os
import resource
import shutil
import subprocess
import sys
import time

from absl import app, flags

from data_pipelines import extraction, synthetic

_CACHE_DIR = flags.DEFINE_string("cache_dir", "~/.cache/atr_jax/benchmark_prepare", "Generated data and runs.")
_CLIPS = flags.DEFINE_integer("clips", 1000, "Clips prepared (at least 3).", lower_bound=3)
_DURATION_S = flags.DEFINE_float("duration_s", 10.0, "Mean clip duration in seconds.")
_WORKERS = flags.DEFINE_integer("workers", None, "prepare --workers (default: one per core).", lower_bound=1)
_BEAM_OPTIONS = flags.DEFINE_string(
  "beam_pipeline_options", "", "prepare --beam_pipeline_options of the Beam run (default: its DirectRunner)."
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def raw_dataset(cache_dir: str, clips: int, duration_s: float) -> str:
  """The folder of the synthetic dataset of `clips` clips, generated on first use under `cache_dir`."""
  raw_dir = os.path.join(cache_dir, f"synthetic_{clips}x{duration_s:g}s")
  if not os.path.isdir(raw_dir):
    counts = {"development": clips - 2, "validation": 1, "evaluation": 1}
    synthetic.generate(raw_dir, counts, duration_s=duration_s)
  return raw_dir


def _children_cpu_s() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def run_prepare(raw_dir: str, out_dir: str, runner: str, workers: int, beam_options: str) -> tuple[float, float]:
  """(wall s, CPU s) of one prepare run into a fresh `out_dir`."""
  shutil.rmtree(out_dir, ignore_errors=True)
  command = [
    sys.executable,
    "-m",
    "data_pipelines.prepare",
    "--dataset=clotho",
    f"--raw_dir={raw_dir}",
    f"--out_dir={out_dir}",
    f"--workers={workers}",
    f"--runner={runner}",
  ]
  if runner == "beam" and beam_options:
    command.append(f"--beam_pipeline_options={beam_options}")
  cpu, started = _children_cpu_s(), time.perf_counter()
  result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
  wall, cpu = time.perf_counter() - started, _children_cpu_s() - cpu
  if result.returncode:
    raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
  return wall, cpu


def _outputs(out_dir: str) -> dict[str, bytes | list[bytes]]:
  """Every file of the prepared dataset (the feature cache left out) by name: its bytes, or for a record file the
  list of its examples, each serialized deterministically."""
  import tensorflow as tf

  (info,) = [os.path.join(d, n) for d, _, names in os.walk(out_dir) for n in names if n == "dataset_info.json"]
  folder, files = os.path.dirname(info), {}
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if ".tfrecord-" in name:
      files[name] = [
        tf.train.Example.FromString(record.numpy()).SerializeToString(deterministic=True)
        for record in tf.data.TFRecordDataset(path)
      ]
    else:
      with open(path, "rb") as f:
        files[name] = f.read()
  return files


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cache_dir = os.path.expanduser(_CACHE_DIR.value)
  raw_dir = raw_dataset(cache_dir, _CLIPS.value, _DURATION_S.value)
  workers = _WORKERS.value or extraction.default_workers()
  rows, outputs = [], {}
  for runner in ("multiprocessing", "beam"):
    out_dir = os.path.join(cache_dir, f"run_{runner}")
    wall, cpu = run_prepare(raw_dir, out_dir, runner, workers, _BEAM_OPTIONS.value)
    outputs[runner] = _outputs(out_dir)
    rows.append((runner, wall, cpu))
  same = "yes" if outputs["multiprocessing"] == outputs["beam"] else "NO"
  clips = _CLIPS.value
  print(f"\n{clips} synthetic clips of {_DURATION_S.value:g} s, {workers} workers, cold feature cache")
  print("| runner | clips | wall s | clips/s | CPU ms/clip | wall vs multiprocessing | same dataset |")
  print("|---|---|---|---|---|---|---|")
  base_wall = rows[0][1]
  for runner, wall, cpu in rows:
    name = "beam (" + (_BEAM_OPTIONS.value or "DirectRunner") + ")" if runner == "beam" else runner
    print(
      f"| {name} | {clips} | {wall:.1f} | {clips / wall:.1f} | {1000 * cpu / clips:.0f} | {wall / base_wall:.2f}x "
      f"| {'-' if runner == 'multiprocessing' else same} |"
    )


if __name__ == "__main__":
  app.run(main)
