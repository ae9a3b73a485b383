"""The DCASE 2025 Task 6 baseline recipe (SPEC 11, 11b) on Clotho v2.1: PaSST-S + RoBERTa-large, one Linear head
per tower, the multi-positive contrastive loss (tau 0.05), batch 64, 20 epochs of Adam: 1 warm-up epoch, then a
cosine from 2e-5 down to 1e-7 over 15 epochs (kept at 1e-7 after), 32 caption tokens, text dropout 0.2, patchout
15/2. As the baseline's code: captions lower-cased with every ASCII punctuation mark deleted (caption_cleaning
"dcase2025"); training clips in 30 s windows (a longer clip's random 30 s, a shorter one padded), each embedded as
the mean of its 10 s segments that hold audio; no frequency or time masking, only the random mel band.

PaSST takes waveforms (its front end runs on the device, with a random mel band in training), so the records hold
32 kHz waveforms (config.data.audio_feature="waveform", prepared into their own folder). Its AudioSet weights:
download `passt-s-f128-p16-s16-ap.468.pt` (hear21passt / PaSST release) and convert them once:

python -m scripts.convert_weights --checkpoint passt-s-f128-p16-s16-ap.468.pt --arch passt --out ~/models/passt_s

and put RoBERTa-large (HF folder: config.json, weights, tokenizer files) in ~/models/roberta-large. Then:

python -m atr_jax.main --config configs/clotho_passt_roberta.py --workdir runs/passt_roberta \
    --config.data.raw_dir=/data/clotho_v2.1

The baseline trains on Clotho + AudioCaps + WavCaps (without Clotho's evaluation clips): add
--config.data.extra_train=audiocaps:DIR:train,wavcaps:DIR:train --config.data.wavcaps_exclude_csv=CSV. On 8 or
more devices, --config.train.param_sharding=fsdp shards RoBERTa-large's parameters and Adam state.
"""

from configs.base import get_base_config


def get_config():
  config = get_base_config()
  config.data.audio_feature = "waveform"
  config.data.caption_cleaning = "dcase2025"
  config.data.train_max_frames = 3000  # 30 s windows, three 10 s segments: the baseline pads or cuts to 30 s.

  config.model.audio.arch = "passt"
  config.model.audio.init_from = "~/models/passt_s"
  config.model.audio.passt.patchout_time = 15
  config.model.audio.passt.patchout_freq = 2
  config.model.text.arch = "roberta"
  config.model.text.model_dir = "~/models/roberta-large"
  config.model.text.dropout = 0.2
  config.model.text.max_len = 32
  config.model.embed_dim = 1024
  config.model.head_hidden = 0  # One Linear layer per tower: Linear(768, 1024) and Linear(1024, 1024).

  config.loss.name = "infonce_multi"
  config.loss.multi_positive_temperature = 0.05

  config.optim.name = "adam"
  config.optim.learning_rate = 2e-5
  config.optim.schedule = "cosine"
  config.optim.warmup_epochs = 1.0
  config.optim.decay_epochs = 15.0
  config.optim.end_learning_rate = 1e-7
  config.optim.grad_clip_norm = 0.0
  config.train.global_batch_size = 64
  config.train.num_epochs = 20
  return config
