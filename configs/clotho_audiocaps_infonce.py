"""The reference-size system (configs/clotho_infonce.py) trained on Clotho development + AudioCaps train together,
validated and tested on Clotho, with the DCASE 2023 submission's schedule: reduce-on-plateau of the validation loss
(x0.5 after 5 epochs without improvement) and its batch of 24 (a multiple of the device count: 1-4, 6, 8, 12, 24).

python -m atr_jax.main --config configs/clotho_audiocaps_infonce.py --workdir runs/clotho_audiocaps \
    --config.data.raw_dir=/data/clotho_v2.1 \
    --config.data.extra_train=audiocaps:/data/audiocaps:train \
    --config.model.text.model_dir=~/models/bert-base-uncased
"""

from configs import clotho_infonce


def get_config():
  config = clotho_infonce.get_config()
  config.data.extra_train = "audiocaps:~/data/audiocaps:train"
  config.data.train_max_frames = 1001  # AudioCaps clips are 10 s; Clotho crops to the same length.
  config.optim.schedule = "plateau"
  config.optim.plateau_factor = 0.5
  config.optim.plateau_patience = 5
  config.train.global_batch_size = 24
  return config
