"""End to end: a tiny synthetic Clotho-layout dataset through preparation, training, checkpoints, automatic
resume, evaluation and results.json."""
import glob
import json
import logging
import os
import shutil

import pytest

from atr_jax import train
from atr_jax.models.bert import minilm_dir
from configs import demo

METRIC_KEYS = {f"{d}_{m}" for d in ("t2a", "a2t") for m in ("R1", "R5", "R10", "mAP10", "medR", "meanR")}


def _tiny_text_model(path):
  """A 2-layer random BERT with MiniLM's tokenizer: the real loading path at a fraction of the cost."""
  os.makedirs(path)
  for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(os.path.join(minilm_dir(), name), path)
  with open(os.path.join(minilm_dir(), "config.json")) as f:
    config = json.load(f)
  config.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  return str(path)


def _tiny_config(tmp_path):
  config = demo.get_config()
  config.data.raw_dir = str(tmp_path / "raw")
  config.data.data_dir = str(tmp_path / "prepared")
  config.data.synthetic.update(num_development=24, num_validation=8, num_evaluation=8, duration_s=1.5)
  config.data.train_max_frames = 128
  config.data.eval_max_frames = 201
  config.model.audio.channels = (4, 4, 8, 8, 16, 16)
  config.model.text.model_dir = _tiny_text_model(tmp_path / "tiny_bert")
  config.model.text.pretrained = False
  config.model.text.max_len = 16
  config.model.embed_dim = 16
  config.model.head_hidden = 32
  config.train.global_batch_size = 16
  config.train.num_epochs = 2
  config.train.log_every_steps = 3
  config.eval.batch_size = 8
  return config


@pytest.mark.slow
def test_train_resume_and_evaluate(tmp_path, caplog):
  config = _tiny_config(tmp_path)
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
