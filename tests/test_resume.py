"""Exact resume: a training run killed (SIGKILL) at fixed steps around its checkpoints (every 2 steps) and its epoch
end, restarted each time with the same command, ends with the same parameters, optimizer state and test metrics as
an uninterrupted run; a NaN loss stops the run with a clear message and keeps the last good checkpoint."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from tiny_run import tiny_config

from atr_jax import checkpointing, train
from data_pipelines import datasets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH = 24 * 5 // 16
NUM_EPOCHS = 2
# Killed after step 3 (one after checkpoint 2, before checkpoint 4), after step 4 (a checkpoint step, its save
# possibly in flight), and after step 9 (past the epoch end's validation at 7 and checkpoint 8).
KILL_STEPS = (3, 4, 9)


def _write_config(tmp_path) -> str:
  path = tmp_path / "resume_config.py"
  path.write_text(
    textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {os.path.join(REPO, "tests")!r})
      from tiny_run import tiny_config

      def get_config():
        config = tiny_config({str(tmp_path)!r})
        config.train.num_epochs = {NUM_EPOCHS}
        config.train.log_every_steps = 1
        config.train.checkpoint_every_steps = 2
        config.optim.schedule = "plateau"
        config.optim.plateau_patience = 0
        config.eval.num_retrieval_examples = 0
        return config
      """)
  )
  return str(path)


def _command(config_path: str, workdir: str) -> list:
  return [sys.executable, "-m", "atr_jax.main", "--config", config_path, "--workdir", workdir]


def _final_state(workdir: str):
  manager = checkpointing.create_manager(workdir, "t2a_mAP10")
  assert manager.latest_step() == NUM_EPOCHS * STEPS_PER_EPOCH
  return manager.best_step(), checkpointing.restore_on_one_device(manager, manager.latest_step())


def _run_killed_at(command: list, kill_step: int) -> str:
  """Runs `command`, SIGKILLs it as soon as it logs training step `kill_step` and returns its output until then."""
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in process.stdout:
    lines.append(line)
    if f"step {kill_step}/" in line:
      process.send_signal(signal.SIGKILL)
      break
  process.wait(timeout=120)
  assert process.returncode == -signal.SIGKILL, f"the run ended before step {kill_step}"
  return "".join(lines)


def _check_console(run: subprocess.CompletedProcess, workdir: str) -> None:
  """The default console of a run: a line per phase and per logged step, the final table; the library details
  (orbax, TFDS, clu) only in the workdir's log file."""
  for phase in (
    "Data: clotho development (24 clips, 120 captions)",
    "Training: 2 epochs x 7 steps",
    "Compiled the training step",
    "step 7/14 epoch 1 loss",
    "Epoch 1/2 validation (validation",
    "Epoch 2/2 validation",
    "Testing the best checkpoint",
  ):
    assert phase in run.stderr, run.stderr
  assert "Best checkpoint (step" in run.stdout and "t2a" in run.stdout
  for detail in ("CheckpointManager", "checkpoint_manager.py", "Constructing tf.data.Dataset", "train/loss="):
    assert detail not in run.stderr, run.stderr
  assert len(run.stderr.splitlines()) < 45, run.stderr  # 14 step lines (log_every_steps=1) and the phases.
  with open(os.path.join(workdir, "atr_jax.INFO")) as f:
    log = f.read()
  assert "CheckpointManager" in log and "step 14/14 epoch 2 loss" in log and "train/loss=" in log


@pytest.mark.slow
def test_killed_run_resumes_exactly(tmp_path):
  config_path = _write_config(tmp_path)
  datasets.train_sources(tiny_config(tmp_path).data)  # Prepare the data once, before both runs.
  uninterrupted, resumed = str(tmp_path / "uninterrupted"), str(tmp_path / "resumed")
  run = subprocess.run(
    _command(config_path, uninterrupted), cwd=REPO, check=True, capture_output=True, text=True, timeout=600
  )
  _check_console(run, uninterrupted)

  for kill_step in KILL_STEPS:  # Each run after the first resumes from whichever checkpoint the last kill left.
    log = _run_killed_at(_command(config_path, resumed), kill_step)
    assert (kill_step == KILL_STEPS[0]) != ("Resuming from the checkpoint of step" in log), log[-3000:]
  restart = subprocess.run(_command(config_path, resumed), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert restart.returncode == 0, restart.stderr[-3000:]
  assert "Resuming from the checkpoint of step" in restart.stderr, restart.stderr[-3000:]

  best_a, state_a = _final_state(uninterrupted)
  best_b, state_b = _final_state(resumed)
  assert best_a == best_b
  leaves_a = jax.tree_util.tree_leaves_with_path(state_a)
  leaves_b = jax.tree.leaves(state_b)
  assert len(leaves_a) == len(leaves_b)
  for (path, a), b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(
      np.asarray(a), np.asarray(b), err_msg=f"{jax.tree_util.keystr(path)} differs after kills at steps {KILL_STEPS}"
    )
  results = [json.load(open(os.path.join(w, "results.json"))) for w in (uninterrupted, resumed)]
  assert results[0] == results[1]


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  config = tiny_config(tmp_path)
  config.train.num_epochs = 1
  config.train.log_every_steps = 100
  config.train.checkpoint_every_steps = 3
  # The learning rate jumps x1e30 after 4 updates: the loss is finite until step 5, NaN from step 6 on.
  config.optim.update(decay_every_epochs=3 / STEPS_PER_EPOCH, decay_factor=1e30, grad_clip_norm=0.0)
  workdir = str(tmp_path / "run")
  with pytest.raises(
    FloatingPointError,
    match=r"training loss is nan at or before step \d+: stopping; the last "
    r"good checkpoint \(step 3\)",
  ):
    train.train_and_evaluate(config, workdir)
  manager = checkpointing.create_manager(workdir, "t2a_mAP10")
  assert manager.all_steps() == [3]
  state = checkpointing.restore_on_one_device(manager, 3)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
