"""Reference-size system on Clotho v2.1: CNN14 + bert-base-uncased, InfoNCE, batch 64, Adam 1e-4, 50 epochs.

python -m atr_jax.main --config configs/clotho_infonce.py --workdir runs/clotho \
    --config.data.raw_dir=/data/clotho_v2.1 --config.model.text.model_dir=~/models/bert-base-uncased
"""
from configs.base import get_base_config


def get_config():
  return get_base_config()
