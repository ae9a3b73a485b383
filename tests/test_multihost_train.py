"""Multi-host training through scripts/launch_local.py: 2 processes x 2 fake CPU devices train step for step as
1 process x 4 devices (same global batches through a fixed data.num_input_shards), across a checkpoint save and a
resume of the 2-process job; 2 processes x 2 devices train a model of the demo's size step by step without stalling.
Also: the launcher's failure and stall handling and atr_jax.distributed's launch detection and flag checks."""

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from tiny_run import tensorboard_scalars, tiny_config

from atr_jax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_TIMEOUT_S = 300
NUM_INPUT_SHARDS = 2  # Fixed, so that the global batches do not depend on the process count.
STEPS_PER_EPOCH = 16 * 5 // 16  # 16 development clips x 5 captions, global batch 16.
# Compiling dominates these tiny runs: LLVM's cheapest optimisation level (the same for every run) halves it.
FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0"


def _write_config(tmp_path) -> str:
  """A config file for main.py holding the tiny config (built once here, as JSON, with its data prepared)."""
  from data_pipelines import datasets

  config = tiny_config(tmp_path)
  config.data.synthetic.num_development = 16
  config.data.num_input_shards = NUM_INPUT_SHARDS
  config.train.num_epochs = 1
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 3  # Also a mid-epoch checkpoint in each epoch.
  config.eval.num_retrieval_examples = 0
  datasets.prepare_builder(config.data)  # Synthetic clips and TFRecords, once for every run.
  (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))
  path = tmp_path / "tiny_config.py"
  path.write_text(
    "import json\n\nimport ml_collections\n\n\ndef get_config():\n"
    f"  with open({str(tmp_path / 'config.json')!r}) as f:\n"
    "    return ml_collections.ConfigDict(json.load(f))\n"
  )
  return str(path)


def _launch(
  num_processes: int, devices_per_process: int, *python_args: str, **env_vars: str
) -> subprocess.CompletedProcess:
  """Runs scripts/launch_local.py; on timeout it is stopped (which stops its processes) and the test fails."""
  command = [
    sys.executable,
    "-m",
    "scripts.launch_local",
    f"--num_processes={num_processes}",
    f"--devices_per_process={devices_per_process}",
    "--",
    *python_args,
  ]
  launcher = subprocess.Popen(
    command,
    cwd=REPO,
    env={**os.environ, "PYTHONPATH": REPO, **env_vars},
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    stdout, stderr = launcher.communicate(timeout=RUN_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    launcher.terminate()
    stdout, stderr = launcher.communicate()
    pytest.fail(f"{' '.join(command)} ran over {RUN_TIMEOUT_S} s:\n{(stdout + stderr)[-6000:]}")
  return subprocess.CompletedProcess(command, launcher.returncode, stdout, stderr)


def _train(
  config_path: str, workdir: str, num_processes: int, devices_per_process: int, num_epochs: int, *flags: str
) -> str:
  xla_flags = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_XLA_FLAGS}"
  result = _launch(
    num_processes,
    devices_per_process,
    "-m",
    "atr_jax.main",
    "--config",
    config_path,
    "--workdir",
    workdir,
    f"--config.train.num_epochs={num_epochs}",
    "--verbosity=1",
    *flags,
    XLA_FLAGS=xla_flags,
  )
  output = result.stdout + result.stderr
  assert result.returncode == 0, f"{num_processes}-process training failed:\n{output[-6000:]}"
  return output


@pytest.mark.slow
def test_two_processes_train_and_resume_as_one(tmp_path):
  config_path = _write_config(tmp_path)
  single, multi = str(tmp_path / "one_process"), str(tmp_path / "two_processes")
  _train(config_path, single, num_processes=1, devices_per_process=4, num_epochs=2)
  first = _train(config_path, multi, num_processes=2, devices_per_process=2, num_epochs=1)
  assert "jax.distributed: process 1 of 2; 2 local devices of 4 global" in first
  assert str(STEPS_PER_EPOCH) in os.listdir(os.path.join(multi, "checkpoints"))
  # One more epoch (allowed explicitly): both processes resume from the checkpoint saved at the epoch end.
  resumed = _train(config_path, multi, 2, 2, 2, "--allow_config_change")
  for process_id in range(2):
    assert any(
      line.startswith(f"[p{process_id}] ") and f"Resuming from the checkpoint of step {STEPS_PER_EPOCH}" in line
      for line in resumed.splitlines()
    ), resumed[-6000:]

  expected, got = tensorboard_scalars(single, "train/loss"), tensorboard_scalars(multi, "train/loss")
  assert sorted(expected) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
  assert sorted(got) == sorted(expected)
  steps = sorted(expected)
  assert np.ptp([expected[s] for s in steps]) > 1e-3  # Training moves the loss: the comparison is not vacuous.
  np.testing.assert_allclose([got[s] for s in steps], [expected[s] for s in steps], rtol=2e-5, atol=1e-6)
  expected_val, got_val = tensorboard_scalars(single, "val/loss"), tensorboard_scalars(multi, "val/loss")
  assert sorted(got_val) == sorted(expected_val) == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
  np.testing.assert_allclose(
    [got_val[s] for s in sorted(got_val)], [expected_val[s] for s in sorted(got_val)], rtol=2e-5
  )
  with open(os.path.join(multi, "results.json")) as f:
    assert json.load(f)["checkpoint_step"] in (STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH)  # Tested at the end.


DEMO_SIZE_STEPS = 5  # Before the fix of issue 18 the first step never finished within STEP_TIMEOUT_S.
FIRST_STEP_TIMEOUT_S = 480  # Start-up, data, initialisation and compilation of both processes on 2 cores.
STEP_TIMEOUT_S = 60  # A demo-size step takes ~1-2 s; a stalled gradient all-reduce took ~70 s per step (issue 18).
DEMO_SIZE_RUN_TIMEOUT_S = 900
_STEP_LINE = re.compile(r"^\[p(\d+)\] .*\bstep (\d+)/(\d+) epoch")


def _demo_size_config(tmp_path) -> str:
  """A config file for main.py: the demo's model (MiniLM + the demo's narrow CNN14, gradients of its size) on a
  shrunk synthetic dataset: DEMO_SIZE_STEPS steps of 8 short clips, one per process and step logged."""
  from configs import demo
  from data_pipelines import datasets, synthetic

  config = demo.get_config()
  config.data.raw_dir = str(tmp_path / "raw")
  config.data.data_dir = str(tmp_path / "prepared")
  config.data.synthetic.update(
    num_development=DEMO_SIZE_STEPS * 8 // 5, num_validation=4, num_evaluation=4, duration_s=1.5
  )
  config.data.train_max_frames = 64  # Random crops; evaluation embeds the whole clips.
  config.data.num_input_shards = NUM_INPUT_SHARDS
  config.train.global_batch_size = 8
  config.train.num_epochs = 1
  config.train.log_every_steps = 1  # Every step is logged, hence finished before the next one starts.
  config.eval.batch_size = 8
  config.eval.num_retrieval_examples = 0
  # The demo's zero-shot evaluation across both processes, on a small ESC-50-layout set here (not the home cache's).
  config.eval.zeroshot.root = str(tmp_path / "esc50")
  synthetic.write_esc50(config.eval.zeroshot.root, clips_per_fold=1, duration_s=1.5)
  datasets.prepare_builder(config.data)
  (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))
  path = tmp_path / "demo_size_config.py"
  path.write_text(
    "import json\n\nimport ml_collections\n\n\ndef get_config():\n"
    f"  with open({str(tmp_path / 'config.json')!r}) as f:\n"
    "    return ml_collections.ConfigDict(json.load(f))\n"
  )
  return str(path)


def _parameter_count(config_path: str) -> int:
  import importlib.util
  from atr_jax.models.dual_encoder import build_model

  spec = importlib.util.spec_from_file_location("demo_size_config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  frames, tokens = config.data.train_max_frames, config.model.text.max_len
  inputs = (
    np.zeros((1, frames, 64), np.float32),
    np.ones((1, frames), bool),
    np.zeros((1, tokens), np.int32),
    np.ones((1, tokens), np.int32),
  )
  variables = jax.eval_shape(lambda: build_model(config.model).init(jax.random.key(0), *inputs, train=False))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def _watched_launch(command: list[str], env: dict, total_steps: int) -> tuple[int, str]:
  """Runs the launcher, following each process's logged steps; stops the job and fails, naming the process and the
  step, when a process's first step takes over FIRST_STEP_TIMEOUT_S or a later one over STEP_TIMEOUT_S (or the run
  over DEMO_SIZE_RUN_TIMEOUT_S)."""
  launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = queue.Queue()
  reader = threading.Thread(target=lambda: [lines.put(line) for line in launcher.stdout], daemon=True)
  reader.start()
  start = time.monotonic()
  output, last_step, since = [], {0: 0, 1: 0}, {0: start, 1: start}
  while launcher.poll() is None or not lines.empty():
    try:
      line = lines.get(timeout=1)
      output.append(line)
      if match := _STEP_LINE.match(line):
        process, step = int(match[1]), int(match[2])
        last_step[process], since[process] = step, time.monotonic()
    except queue.Empty:
      pass
    for process, step in last_step.items():
      limit = FIRST_STEP_TIMEOUT_S if step == 0 else STEP_TIMEOUT_S
      if step < total_steps and time.monotonic() - since[process] > limit and launcher.poll() is None:
        launcher.terminate()  # The launcher stops its processes.
        launcher.wait()
        pytest.fail(
          f"stalled: process {process} did not finish step {step + 1} within {limit} s of "
          f"{'its start' if step == 0 else f'step {step}'} (steps per process: {last_step}):\n"
          + "".join(output)[-6000:]
        )
    if time.monotonic() - start > DEMO_SIZE_RUN_TIMEOUT_S and launcher.poll() is None:
      launcher.terminate()
      launcher.wait()
      pytest.fail(
        f"the run took over {DEMO_SIZE_RUN_TIMEOUT_S} s (steps per process: {last_step}):\n" + "".join(output)[-6000:]
      )
  reader.join(timeout=5)
  return launcher.returncode, "".join(output)


@pytest.mark.slow
def test_two_processes_of_two_devices_train_a_demo_size_model_without_stalling(tmp_path):
  config_path = _demo_size_config(tmp_path)
  assert _parameter_count(config_path) > 20e6  # The demo's model, not a shrunk one: its gradients are ~100 MB.
  workdir = str(tmp_path / "run")
  command = [
    sys.executable,
    "-m",
    "scripts.launch_local",
    "--num_processes=2",
    "--devices_per_process=2",
    f"--stall_timeout_s={STEP_TIMEOUT_S}",
    "--",
    "-m",
    "atr_jax.main",
    "--config",
    config_path,
    "--workdir",
    workdir,
    "--verbosity=1",
  ]  # Every process's steps, for the stall detection.
  returncode, output = _watched_launch(command, {**os.environ, "PYTHONPATH": REPO}, DEMO_SIZE_STEPS)
  assert returncode == 0, output[-6000:]
  assert "jax.distributed: process 1 of 2; 2 local devices of 4 global" in output
  losses = tensorboard_scalars(workdir, "train/loss")
  assert sorted(losses) == list(range(1, DEMO_SIZE_STEPS + 1))
  assert np.all(np.isfinite(list(losses.values()))) and np.ptp(list(losses.values())) > 1e-3
  assert os.path.exists(os.path.join(workdir, "results.json"))
  assert sorted(tensorboard_scalars(workdir, "zeroshot/fold1")) == [DEMO_SIZE_STEPS]  # Zero-shot at validation.


def test_launcher_stops_the_job_when_one_process_fails():
  program = (
    "import sys, time\n"
    "process_id = int(next(a for a in sys.argv if a.startswith('--process_id=')).split('=')[1])\n"
    "print('started', flush=True)\n"
    "sys.exit(3) if process_id == 1 else time.sleep(120)\n"
  )
  start = time.monotonic()
  result = _launch(2, 1, "-c", program)
  assert time.monotonic() - start < 60, "the surviving process was not stopped"
  assert result.returncode == 3
  assert "process 1 exited with code 3" in result.stderr
  assert "[p0] started" in result.stdout and "[p1] started" in result.stdout


# The start of a program run by `_launch`: the process joins the job with the flags the launcher passes.
_JOINED_PROGRAM = (
  "import sys, time\n"
  "import jax\n"
  "from jax.experimental import multihost_utils\n"
  "from atr_jax import distributed\n"
  "flags = dict(arg[2:].split('=') for arg in sys.argv[1:])\n"
  "distributed.maybe_initialize(flags['coordinator_address'], int(flags['num_processes']),\n"
  "                             int(flags['process_id']))\n"
)


@pytest.mark.slow
def test_a_failing_process_ends_the_job_at_once():
  """Process 1 raises while process 0 waits for it in a collective: process 1 exits at once (instead of waiting in
  jax.distributed's shutdown barrier) and the launcher names it and stops process 0."""
  program = (
    _JOINED_PROGRAM + "with distributed.exit_fast_on_failure():\n"
    "  if jax.process_index() == 1:\n"
    "    raise RuntimeError('boom')\n"
    "  multihost_utils.sync_global_devices('waits for process 1')\n"
  )
  result = _launch(2, 1, "-c", program)
  assert result.returncode == 1
  assert "process 1 exited with code 1" in result.stderr, result.stdout[-3000:] + result.stderr
  assert "[p1] RuntimeError: boom" in result.stdout
  assert "process 1 of 2 failed; exiting without waiting for the others" in result.stdout


def test_launcher_gives_each_process_its_devices_and_coordinator_flags():
  program = (
    "import os, sys\n"
    "print(os.environ['XLA_FLAGS'], os.environ['ATR_JAX_STALL_TIMEOUT_S'],\n"
    "      os.environ.get('JAX_COMPILATION_CACHE_DIR', 'no-compilation-cache'), *sys.argv[1:], flush=True)\n"
  )
  env_flags = os.environ.get("XLA_FLAGS", "")
  assert os.environ["JAX_COMPILATION_CACHE_DIR"]  # conftest's: the launcher keeps it from the processes.
  result = _launch(3, 5, "-c", program)
  assert result.returncode == 0, result.stderr
  lines = sorted(line for line in result.stdout.splitlines() if line.startswith("[p"))
  assert len(lines) == 3
  ports = set()
  for process_id, line in enumerate(lines):
    prefix, *words = line.split()
    assert prefix == f"[p{process_id}]"
    assert words.count("--xla_force_host_platform_device_count=5") == 1
    assert not any(w.startswith("--xla_force_host_platform_device_count=") and not w.endswith("=5") for w in words)
    assert {w for w in env_flags.split() if "device_count" not in w} <= set(words)  # Other XLA flags kept.
    assert "--xla_cpu_collective_timeout_seconds=600" in words and "600" in words  # The default stall timeouts.
    assert "--num_processes=3" in words and f"--process_id={process_id}" in words
    assert "no-compilation-cache" in words
    ports |= {w for w in words if w.startswith("--coordinator_address=127.0.0.1:")}
  assert len(ports) == 1  # Every process gets the same coordinator.


@pytest.mark.slow
def test_a_stalled_collective_ends_the_job_with_a_timeout_error():
  """Process 1 never joins process 0's collective: with --stall_timeout_s=5, process 0 fails with gloo's timeout
  (XLA's --xla_cpu_collective_timeout_seconds set by the launcher) and the launcher stops the job."""
  program = (
    _JOINED_PROGRAM + "with distributed.exit_fast_on_failure():\n"
    "  multihost_utils.sync_global_devices('both arrive')\n"
    "  if jax.process_index() == 1:\n"
    "    time.sleep(120)\n"
    "  multihost_utils.sync_global_devices('process 1 never arrives')\n"
  )
  start = time.monotonic()
  command = [
    sys.executable,
    "-m",
    "scripts.launch_local",
    "--num_processes=2",
    "--stall_timeout_s=5",
    "--",
    "-c",
    program,
  ]
  result = subprocess.run(
    command, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
  )
  assert time.monotonic() - start < 90, "the stalled collective did not time out"
  assert result.returncode == 1, result.stdout[-3000:] + result.stderr
  assert "process 0 exited with code 1" in result.stderr, result.stdout[-3000:] + result.stderr
  assert "Timed out waiting 5000ms" in result.stdout, result.stdout[-3000:]


@pytest.mark.parametrize(
  "environ, expected",
  [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, None),  # Batch step, not an srun step.
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4"}, "SLURM step of 4 tasks"),
    ({"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "3"}, "Open MPI job of 8 ranks"),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, "Cloud TPU job of 4 workers x 1 slices"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1", "MEGASCALE_NUM_SLICES": "2"}, "Cloud TPU job of 2 workers x 2 slices"),
  ],
)
def test_detect_launcher(environ, expected):
  assert distributed.detect_launcher(environ) == expected


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, "--process_id=2 must be below"),
    ({"coordinator_address": "h:1", "num_processes": 0, "process_id": 0}, "--num_processes=0"),
    ({"coordinator_address": "h", "num_processes": 2, "process_id": 0}, "is not HOST:PORT"),
    ({"coordinator_address": "h:1"}, "missing: --num_processes, --process_id"),
    ({"num_processes": 2, "process_id": 1}, "missing: --coordinator_address"),
    ({"num_processes": 2, "process_id": 1, "mode": "off"}, "--distributed=off contradicts"),
    ({"mode": "sometimes"}, "is not one of"),
    ({"environ": {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}}, "pass --coordinator_address"),
  ],
)
def test_inconsistent_flags_are_rejected_before_initializing(kwargs, message):
  kwargs.setdefault("environ", {})
  with pytest.raises(ValueError, match=message):
    distributed.maybe_initialize(**kwargs)
  assert not jax.distributed.is_initialized()


def test_single_process_without_a_launcher():
  slurm_batch_step = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}
  assert distributed.maybe_initialize(environ=slurm_batch_step) is False
  assert distributed.maybe_initialize(mode="off", environ={"SLURM_STEP_NUM_TASKS": "4"}) is False
