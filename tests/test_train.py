"""End to end: a tiny synthetic Clotho-layout dataset through preparation, training, checkpoints, automatic
resume, evaluation and results.json."""

import csv
import glob
import json
import logging
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from tiny_run import tiny_config

from atr_jax import checkpointing, train
from data_pipelines import datasets, input_pipeline

METRIC_KEYS = {f"{d}_{m}" for d in ("t2a", "a2t") for m in ("R1", "R5", "R10", "mAP10", "medR", "meanR")}


def _results(workdir: str) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.mark.slow
def test_train_resume_and_evaluate(tiny_trained, tmp_path, caplog):
  config, trained = tiny_trained
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  results = _results(workdir)
  assert METRIC_KEYS <= set(results) and results["split"] == "evaluation"
  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*")), "no TensorBoard summaries"
  steps_per_epoch = 24 * 5 // 16
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps[-1] == 2 * steps_per_epoch and len(steps) <= 2

  # One more epoch changes the step count: refused, unless allowed; then it resumes from the latest checkpoint.
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.num_epochs = 3
  config.train.global_batch_size = 8
  with pytest.raises(
    ValueError,
    match=r"another data order or step count.*train\.global_batch_size: 16 -> 8; "
    r"train\.num_epochs: 2 -> 3\).*--allow_config_change",
  ):
    train.train_and_evaluate(config, workdir)
  config.train.global_batch_size = 16
  caplog.set_level(logging.INFO, logger="absl")  # absl's own level too: an earlier in-process CLI may have raised it.
  train.train_and_evaluate(config, workdir, allow_config_change=True)
  assert f"Resuming from the checkpoint of step {2 * steps_per_epoch}" in caplog.text
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps[-1] == 3 * steps_per_epoch and len(steps) <= 2

  # Re-evaluation of the best checkpoint reproduces results.json exactly; with a graded relevance table that gives
  # each caption its own clip only, the graded mAP@10 is the plain one.
  before = _results(workdir)
  captions, clip_ids, file_names = input_pipeline.eval_captions(
    datasets.prepare_builder(config.data), config.data.test_split
  )
  assert len(set(captions)) == len(captions)
  table = tmp_path / "relevance.csv"
  with open(table, "w", newline="") as f:
    csv.writer(f).writerows(
      [("query", "audio_filenames")] + [(c, repr([file_names[i]])) for c, i in zip(captions, clip_ids)]
    )
  config.eval.relevance_csv = str(table)
  again = train.evaluate_best(config, workdir)
  assert {k: again[k] for k in METRIC_KEYS} == {k: before[k] for k in METRIC_KEYS}
  graded = _results(workdir)
  assert graded["t2a_mAP10_graded"] == pytest.approx(before["t2a_mAP10"], abs=1e-6)
  assert graded["t2a_mAP16_graded"] >= graded["t2a_mAP10_graded"] > 0


@pytest.mark.slow
def test_fsdp_run_equals_the_replicated_run(tiny_trained, tmp_path):
  """FSDP trains through epoch ends, validation, checkpoints, restore and re-evaluation to the replicated run's
  results (tiny BERT's embedding tables and the wider kernels are sharded)."""
  config, replicated = tiny_trained
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.param_sharding = "fsdp"
  workdir = str(tmp_path / "fsdp")
  metrics = train.train_and_evaluate(config, workdir)
  expected = _results(replicated)
  assert _results(workdir)["checkpoint_step"] == expected["checkpoint_step"]
  np.testing.assert_allclose(
    [metrics[k] for k in sorted(METRIC_KEYS)], [expected[k] for k in sorted(METRIC_KEYS)], atol=1e-6
  )
  again = train.evaluate_best(config, workdir)  # Restore into FSDP shardings, then the test split again.
  assert {k: again[k] for k in METRIC_KEYS} == {k: metrics[k] for k in METRIC_KEYS}
  manager, reference_manager = (checkpointing.create_manager(w, "t2a_mAP10") for w in (workdir, replicated))
  assert manager.latest_step() == reference_manager.latest_step()
  state = checkpointing.restore_on_one_device(manager, manager.latest_step())
  reference = checkpointing.restore_on_one_device(reference_manager, reference_manager.latest_step())
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(reference["params"]), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_training_learns_its_pairs(tmp_path):
  """The loop learns: 20 epochs on 8 clips (40 captions, regularisers off) and the best checkpoint retrieves the
  training clips from their captions and back far above chance (1/8 R@1; the untrained model scores ~0.125).
  Captions paired with the wrong clips, or training text that differs from evaluation text, fail it."""
  config = tiny_config(tmp_path)
  config.data.synthetic.num_development = 8
  config.data.val_split = config.data.test_split = config.data.train_split
  config.model.audio.update(spec_augment=False, dropout=0.0)
  config.model.text.dropout = 0.0
  config.optim.update(learning_rate=3e-3, text_learning_rate=3e-3, warmup_epochs=0.0, decay_every_epochs=100.0)
  config.train.num_epochs = 20
  config.train.log_every_steps = 100
  config.eval.num_retrieval_examples = 0
  metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert metrics["t2a_R1"] >= 0.6 and metrics["a2t_R1"] >= 0.6, metrics


def test_the_training_crop_defaults_to_the_longest_training_clip(tmp_path):
  config = tiny_config(tmp_path)
  config.data.train_max_frames = 0
  setup = train._Setup(config, str(tmp_path / "run"))
  assert setup.train_max_frames == input_pipeline.longest_clip(setup.sources) > 0
  batch = next(iter(setup.train_batches(epoch=0, skip_batches=0)))
  assert batch["log_mel"].shape[1] == setup.train_max_frames


def test_cli_rejects_misspelt_config_key(tmp_path):
  import subprocess
  import sys

  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "atr_jax.main",
      "--config",
      "configs/demo.py",
      "--workdir",
      str(tmp_path),
      "--config.train.num_epoch=3",
    ],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert result.returncode != 0
  assert "num_epoch" in result.stderr
  assert not os.listdir(tmp_path)  # Nothing was started.
