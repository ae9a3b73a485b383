"""Demo of the PaSST tower: a narrow PaSST (4 blocks of width 128, from scratch) learns to map the demo's synthetic
clips into pretrained MiniLM's sentence space (MiniLM frozen; the Linear heads and the PaSST train), with the DCASE
2025 baseline's multi-positive loss, in a few minutes on 2 CPU cores.

  python -m atr_jax.main --config configs/demo_passt.py --workdir runs/demo_passt

The records hold waveforms (PaSST's front end runs in the model), prepared beside the demo's log-mel records.
"""

from configs import demo


def get_config():
  config = demo.get_config()
  config.data.audio_feature = "waveform"
  config.data.train_max_frames = 240  # Every synthetic clip (1.67-2.33 s) whole, as the CNN14 demo.

  config.model.audio.arch = "passt"
  config.model.audio.passt.embed_dim = 128
  config.model.audio.passt.depth = 4
  config.model.audio.passt.num_heads = 4
  config.model.audio.passt.mlp_dim = 512
  # The baseline drops 15 of a 10 s clip's 62 time columns: about a quarter, here 3 of a 2 s clip's 12.
  config.model.audio.passt.patchout_time = 3
  config.model.audio.passt.patchout_freq = 1
  config.model.head_hidden = 0

  config.loss.name = "infonce_multi"
  config.loss.multi_positive_temperature = 0.05
  config.optim.schedule = "cosine"
  config.optim.frozen = ("text",)  # MiniLM's sentence space is the target: no text backward pass, faster steps.
  config.optim.warmup_epochs = 0.5
  config.optim.learning_rate = 5e-4
  config.train.num_epochs = 4
  return config
