"""The DCASE 2026 Task 6 baseline recipe (AM-DETR, SPEC 12) on our own towers: a QD-DETR at the published sizes
(d 256, 8 heads, FFN 1024, dropout 0.1, 10 queries; AdamW 1e-4 / wd 1e-4, batch 32, 200 epochs, clip 0.1: the
configs/base.py defaults of config.moments) over 1 s frames of a trained dual encoder (`clap_like` features),
pre-trained on Clotho-Moment, then trained on CASTELLA from the pre-trained parameters. Two commands, one per stage
(`python -m atr_jax.moments train --config configs/castella_amdetr.py:<stage>`):

  python -m atr_jax.moments train --config configs/castella_amdetr.py:clotho_moment \\
      --workdir runs/amdetr_clotho_moment \\
      --config.moments.encoder_workdir=runs/clotho --config.moments.data.dir=CLOTHO_MOMENT
  python -m atr_jax.moments train --config configs/castella_amdetr.py:castella --workdir runs/amdetr_castella \\
      --config.moments.encoder_workdir=runs/clotho --config.moments.data.dir=CASTELLA \\
      --config.moments.init_from=runs/amdetr_clotho_moment
  python -m atr_jax.moments evaluate --workdir runs/amdetr_castella \\
      --annotations CASTELLA/castella_test_release.jsonl --audio_dir CASTELLA/test

CLOTHO_MOMENT holds `clotho_moment_{train,val,test}_release.jsonl` and the recordings in `{train,val,test}/`; CASTELLA
holds `castella_{train,val,test}_release.jsonl` and its recordings in `{train,val,test}/` (`<vid>.<ext>`). Both stages
must use the same encoder workdir (the features of one space). Any trained atr-jax workdir serves as the encoder
(runs/clotho from configs/clotho_infonce.py here; a PaSST/RoBERTa one for the strongest towers).
"""

from configs.base import get_base_config

ANNOTATIONS = {"clotho_moment": "clotho_moment_{split}_release.jsonl", "castella": "castella_{split}_release.jsonl"}


def get_config(stage: str = "clotho_moment"):
  if stage not in ANNOTATIONS:
    raise ValueError(f"configs/castella_amdetr.py:{stage}: the stage is one of {sorted(ANNOTATIONS)}")
  config = get_base_config()
  config.moments.data.annotations = ANNOTATIONS[stage]
  config.moments.data.audio_dir = "{split}"
  config.moments.data.features = "clap_like"
  return config
