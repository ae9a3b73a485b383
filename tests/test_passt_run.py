"""PaSST end to end on waveform records: a tiny PaSST + Linear heads + multi-positive loss run trains from the
prepared waveforms, and retrieval (audio files decoded by the serving path) embeds each clip exactly as evaluation
embedded it from the records."""

import os

import numpy as np
import pytest
from tiny_run import tiny_config

from atr_jax import api, train
from data_pipelines import input_pipeline


@pytest.mark.slow
def test_a_tiny_passt_run_trains_and_serves_what_it_evaluates(tmp_path):
  config = tiny_config(tmp_path)
  config.data.audio_feature = "waveform"
  config.model.audio.arch = "passt"
  config.model.audio.passt.update(embed_dim=32, depth=1, num_heads=2, mlp_dim=64, patchout_time=2, patchout_freq=1)
  config.model.head_hidden = 0
  config.loss.name = "infonce_multi"
  config.train.num_epochs = 1
  workdir = str(tmp_path / "run")
  metrics = train.train_and_evaluate(config, workdir)
  assert np.isfinite(metrics["t2a_mAP10"]) and os.path.exists(os.path.join(workdir, "results.json"))

  retriever = api.Model(workdir)
  assert retriever.audio_form.name == "waveform"
  builder = train._Setup(config, workdir, training=False).builder
  assert input_pipeline.audio_form_of(builder).name == "waveform"
  evaluated = retriever.embed_split(builder, config.data.test_split)
  paths = [os.path.join(config.data.raw_dir, config.data.test_split, name) for name in evaluated.file_names]
  served, kept, skipped = retriever.embed_audio_files(paths, batch_size=4)
  assert kept == paths and not skipped
  np.testing.assert_allclose(served, evaluated.audio, atol=1e-5)
  assert np.abs(evaluated.audio - evaluated.audio[:1]).max() > 1e-3  # the clips' embeddings differ
