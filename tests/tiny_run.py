"""A tiny end-to-end configuration for tests: a small synthetic dataset, a narrow CNN14 and a 2-layer random BERT
that uses MiniLM's tokenizer (the real loading path at a fraction of the cost), and a reader of the TensorBoard
scalars a run writes."""

import glob
import json
import os
import pathlib
import shutil

from atr_jax.models.bert import minilm_dir
from configs import demo


def _tiny_text_model(path):
  """A 2-layer random BERT with MiniLM's tokenizer: the real loading path at a fraction of the cost."""
  os.makedirs(path, exist_ok=True)  # Idempotent: configs of subprocess runs rebuild it.
  for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(os.path.join(minilm_dir(), name), path)
  with open(os.path.join(minilm_dir(), "config.json")) as f:
    config = json.load(f)
  config.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  return str(path)


def tiny_config(tmp_path):
  """The tiny config with every path under `tmp_path` (a pathlib.Path or str; calling it again is harmless)."""
  tmp_path = pathlib.Path(tmp_path)
  config = demo.get_config()
  config.data.raw_dir = str(tmp_path / "raw")
  config.data.data_dir = str(tmp_path / "prepared")
  config.data.synthetic.update(num_development=24, num_validation=8, num_evaluation=8, duration_s=1.5)
  config.data.train_max_frames = 128
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
  config.eval.zeroshot.dataset = ""  # The demo's zero-shot set is off here (the tiny_trained fixture sets a small one).
  return config


def tensorboard_scalars(workdir: str, tag: str) -> dict[int, float]:
  """step -> value of `tag` in the TensorBoard event files of `workdir` (those of every run into it)."""
  import tensorflow as tf

  values = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    for record in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for value in event.summary.value:
        if value.tag == tag:
          assert event.step not in values, f"{tag} written twice for step {event.step}"
          values[event.step] = float(tf.make_ndarray(value.tensor))
  return values
