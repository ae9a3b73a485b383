"""Reference-size system on Clotho v2.1: CNN14 + bert-base-uncased, InfoNCE, batch 64, Adam 1e-4, 50 epochs.

The audio tower starts from PANNs' AudioSet-pretrained CNN14 when its converted weights are in PANNS_CNN14_DIR
(~/models/panns/cnn14). Download `Cnn14_mAP=0.431.pth` (PANNs release, Zenodo 3987831) and convert it once:

python -m scripts.convert_panns --checkpoint Cnn14_mAP=0.431.pth --arch cnn14 --out ~/models/panns/cnn14

Without that folder the tower is randomly initialised (a warning is logged); another folder:
--config.model.audio.init_from=DIR. Then:

python -m atr_jax.main --config configs/clotho_infonce.py --workdir runs/clotho \
    --config.data.raw_dir=/data/clotho_v2.1 --config.model.text.model_dir=~/models/bert-base-uncased
"""
import os

from absl import logging

from configs.base import get_base_config

PANNS_CNN14_DIR = os.path.expanduser("~/models/panns/cnn14")


def get_config():
  config = get_base_config()
  if os.path.isdir(PANNS_CNN14_DIR):
    config.model.audio.init_from = PANNS_CNN14_DIR
  else:
    logging.warning("No converted PANNs CNN14 in %s: the audio tower starts from random weights (see "
                    "configs/clotho_infonce.py to convert Cnn14_mAP=0.431.pth)", PANNS_CNN14_DIR)
  return config
