"""End to end: a tiny synthetic Clotho-layout dataset through preparation, training, checkpoints, automatic
resume, evaluation and results.json."""
import glob
import json
import logging
import os

import pytest
from tiny_run import tiny_config

from atr_jax import train

METRIC_KEYS = {f"{d}_{m}" for d in ("t2a", "a2t") for m in ("R1", "R5", "R10", "mAP10", "medR", "meanR")}


@pytest.mark.slow
def test_train_resume_and_evaluate(tmp_path, caplog):
  config = tiny_config(tmp_path)
  workdir = str(tmp_path / "run")
  metrics = train.train_and_evaluate(config, workdir)
  assert set(metrics) >= METRIC_KEYS
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert METRIC_KEYS <= set(results) and results["split"] == "evaluation"
  assert all(0.0 <= results[k] <= 1.0 for k in METRIC_KEYS if "R" in k and "med" not in k and "mean" not in k)
  assert 1.0 <= results["t2a_medR"] <= 8 and 1.0 <= results["a2t_meanR"] <= 40
  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*")), "no TensorBoard summaries"
  steps_per_epoch = 24 * 5 // 16
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps[-1] == 2 * steps_per_epoch and len(steps) <= 2

  # Same command with one more epoch: resumes from the latest checkpoint instead of starting over.
  config.train.num_epochs = 3
  caplog.set_level(logging.INFO)
  train.train_and_evaluate(config, workdir)
  assert f"Resuming from the checkpoint of step {2 * steps_per_epoch}" in caplog.text
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps[-1] == 3 * steps_per_epoch and len(steps) <= 2

  # Re-evaluation of the best checkpoint reproduces results.json exactly.
  before = json.load(open(os.path.join(workdir, "results.json")))
  again = train.evaluate_best(config, workdir)
  assert {k: again[k] for k in METRIC_KEYS} == {k: before[k] for k in METRIC_KEYS}


def test_cli_rejects_misspelt_config_key(tmp_path):
  import subprocess
  import sys
  result = subprocess.run(
      [sys.executable, "-m", "atr_jax.main", "--config", "configs/demo.py", "--workdir", str(tmp_path),
       "--config.train.num_epoch=3"], capture_output=True, text=True, timeout=300,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode != 0
  assert "num_epoch" in result.stderr
  assert not os.listdir(tmp_path)  # Nothing was started.
