"""Moment-retrieval demo (SPEC 12): the CNN14 demo's config and workdir (`runs/demo`, trained first when missing),
whose towers give the frame and token features, a Clotho-Moment-style set synthesised from the demo's synthetic
Clotho folder (30 s recordings of 1-3 events; each clip in one split), and a narrowed AM-DETR that trains in minutes
on 2 CPU cores.

  python -m atr_jax.moments train --config configs/demo_moments.py --workdir runs/moments
  python -m atr_jax.moments evaluate --workdir runs/moments \\
      --annotations ~/.cache/atr_jax/synthetic_clotho_moment/test.jsonl \\
      --audio_dir ~/.cache/atr_jax/synthetic_clotho_moment/test
"""

import os

from configs import demo


def get_config():
  config = demo.get_config()
  config.moments.encoder_workdir = "runs/demo"
  config.moments.train_encoder = True
  config.moments.data.dir = os.path.expanduser("~/.cache/atr_jax/synthetic_clotho_moment")
  config.moments.data.synthesize = True  # From config.data.raw_dir, the demo's synthetic Clotho folder.
  config.moments.data.synthetic_duration = 30  # Clotho-Moment's are 60 s.
  # d 256, FFN 1024, 8 heads, dropout 0.1 / input dropout 0.5 upstream: narrower and lightly regularised here.
  config.moments.model.update(hidden_dim=128, num_heads=4, ffn_dim=512, dropout=0.0, input_dropout=0.1)
  # 577 training queries: lr 1e-3 (upstream 1e-4) so that ~1000 steps (60 epochs x 18) get somewhere on 2 cores.
  config.moments.train.update(learning_rate=1e-3, num_epochs=60, eval_every_epochs=10, log_every_steps=20)
  return config
