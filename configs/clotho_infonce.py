"""Reference-size system on Clotho v2.1: CNN14 + bert-base-uncased, InfoNCE, batch 64, Adam 1e-4, 50 epochs.

The audio tower starts from PANNs' AudioSet-pretrained CNN14 (model.audio.init_from, ~/models/panns/cnn14 by
default; a missing folder stops the run before any work). Download `Cnn14_mAP=0.431.pth` (PANNs release, Zenodo
3987831) and convert it once:

python -m scripts.convert_weights --checkpoint Cnn14_mAP=0.431.pth --arch cnn14 --out ~/models/panns/cnn14

(another folder: --config.model.audio.init_from=DIR; random initialisation: --config.model.audio.init_from=scratch).
Then:

python -m atr_jax.main --config configs/clotho_infonce.py --workdir runs/clotho \
    --config.data.raw_dir=/data/clotho_v2.1 --config.model.text.model_dir=~/models/bert-base-uncased
"""

from configs.base import get_base_config


def get_config():
  return get_base_config()
