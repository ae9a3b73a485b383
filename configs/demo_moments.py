"""Moment-retrieval demo (SPEC 12): the CNN14 demo's config (whose trained workdir gives the frame and token
features) plus a narrowed AM-DETR that trains on the synthetic 60 s recordings in minutes on 2 CPU cores. The
moment data's keys (the synthetic set, the features setting) come with the moment command."""

from configs import demo


def get_config():
  config = demo.get_config()
  config.moments.model.update(hidden_dim=128, num_heads=4, ffn_dim=512)  # d 256, FFN 1024, 8 heads upstream.
  config.moments.train.update(global_batch_size=32, num_epochs=30, eval_every_epochs=5, log_every_steps=20)
  return config
