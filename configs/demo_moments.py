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
  config.moments.model.update(hidden_dim=128, num_heads=4, ffn_dim=512)  # d 256, FFN 1024, 8 heads upstream.
  config.moments.train.update(global_batch_size=32, num_epochs=30, eval_every_epochs=5, log_every_steps=20)
  return config
