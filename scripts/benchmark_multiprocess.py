"""Multi-process training-step benchmark: the jitted `train.train_step` of a config (random inputs, as in
scripts/benchmark_train.py) run as P processes x D CPU devices through scripts/launch_local.py, one layout after the
other, side by side in one markdown table: compile time, step time (median of the timed steps after warm-up) and
the step time over that of one process on the same number of devices (which runs without jax.distributed, as
`python -m atr_jax.main` alone does).

python -m scripts.benchmark_multiprocess --config configs/demo.py --layouts 1x4,2x2,1x2,2x1
"""

import sys

from atr_jax import xla_flags

if any(arg.startswith("--process_result=") for arg in sys.argv):
  xla_flags.set_defaults()  # Before jax is imported: what atr_jax.main does.

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from scripts import benchmark_train  # noqa: E402  Its flags --config, --repeats and --warmup serve here too.

_LAYOUTS = flags.DEFINE_list("layouts", ["1x4", "2x2", "1x2", "2x1"], "PROCESSESxDEVICES layouts to time.")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 900, "Wall-clock limit of one layout's run.")
_PROCESS_RESULT = flags.DEFINE_string(
  "process_result", None, "Internal: run one process of a layout; process 0 writes its figures as JSON to this path."
)
flags.DEFINE_string("coordinator_address", None, "Set by scripts/launch_local.py.")
flags.DEFINE_integer("num_processes", None, "Set by scripts/launch_local.py.")
flags.DEFINE_integer("process_id", None, "Set by scripts/launch_local.py.")


def _worker(config, result_path: str) -> None:
  import jax
  from atr_jax import distributed

  if flags.FLAGS.num_processes > 1:  # One process runs as `python -m atr_jax.main` alone would: no jax.distributed.
    distributed.maybe_initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id)
  bench = benchmark_train._setup_jax(config)
  benchmark_train._timed(bench.run_step, benchmark_train._WARMUP.value)
  times = benchmark_train._timed(bench.run_step, benchmark_train._REPEATS.value)
  if jax.process_index() == 0:
    with open(result_path, "w") as f:
      json.dump({"init_s": bench.info["init_s"], "compile_s": bench.info["compile_s"], "times": times}, f)


def _worker_argv(argv: list[str]) -> list[str]:
  """`argv` without this script's own flags (--layouts, --timeout_s, as --flag=value or --flag value)."""
  own = ("--layouts", "--timeout_s")
  kept, skip = [], False
  for arg in argv:
    if skip:
      skip = False
    elif arg in own:
      skip = True
    elif not arg.startswith(tuple(f"{flag}=" for flag in own)):
      kept.append(arg)
  return kept


def run_layout(layout: str, argv: list[str], timeout_s: int) -> dict:
  """Runs this script's worker as `layout` ("PxD") processes x devices; -> process 0's figures."""
  num_processes, devices = (int(n) for n in layout.split("x"))
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "result.json")
    command = [
      sys.executable,
      "-m",
      "scripts.launch_local",
      f"--num_processes={num_processes}",
      f"--devices_per_process={devices}",
      "--",
      "-m",
      "scripts.benchmark_multiprocess",
      *argv,
      f"--process_result={path}",
    ]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
    if result.returncode != 0 or not os.path.exists(path):
      raise RuntimeError(f"layout {layout} failed (exit code {result.returncode}):\n{result.stdout[-4000:]}")
    with open(path) as f:
      return {"processes": num_processes, "devices": devices, **json.load(f)}


def format_table(config, results: list[dict]) -> str:
  """One markdown row per layout; the last column is its step time over that of the 1-process layout with the same
  total device count (when timed)."""
  single = {r["processes"] * r["devices"]: float(np.median(r["times"])) for r in results if r["processes"] == 1}
  batch = config.train.global_batch_size
  rows = [
    "| processes x devices | batch | init s | compile s | step s median (min-max) | pairs/s | time / 1 process |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in results:
    median = float(np.median(r["times"]))
    reference = single.get(r["processes"] * r["devices"])
    ratio = "-" if reference is None else f"{median / reference:.2f}"
    rows.append(
      f"| {r['processes']} x {r['devices']} | {batch} | {r['init_s']:.1f} | {r['compile_s']:.1f} | "
      f"{median:.3f} ({min(r['times']):.3f}-{max(r['times']):.3f}) | {batch / median:.1f} | {ratio} |"
    )
  return "\n".join(rows)


def main(argv):
  del argv
  config = benchmark_train._CONFIG.value
  if _PROCESS_RESULT.value is not None:
    _worker(config, _PROCESS_RESULT.value)
    return
  results = [run_layout(layout, _worker_argv(sys.argv[1:]), _TIMEOUT.value) for layout in _LAYOUTS.value]
  print(format_table(config, results), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
