"""hear21passt's PyTorch PaSST as a reference: the yardstick audio tower of `scripts.benchmark_train --torch` for
model.audio.arch="passt" (through scripts/torch_reference.py) and of tests/test_passt.py (through tests/torch_passt.py).

hear21passt (installed with --no-deps: its torchaudio needs another torch) imports timm only for a download helper;
when timm is absent, empty `timm`, `timm.models` and `timm.models._hub` modules stand in for it (SPEC 11). Its own
front end (`AugmentMelSTFT`) needs torchaudio, so `FrontEnd` is a torch port of data_pipelines/passt_features.py
(the same formulas: pre-emphasis, centred STFT 1024 / hop 320 with an 800-sample symmetric Hann window, power
spectrum, Kaldi mel banks, log, (x + 4.5) / 5), with hear21passt's random band per batch in training.

Owns: `passt_s` (random-weight PaSST-S at full or reduced depth, the tests' reference), `FrontEnd`, `PasstTower`
(waveforms -> front end -> hear21passt `PaSST.forward_features` -> mean of the cls and distillation tokens) and
`tower_from_config` (our `model.audio` -> the same-size PasstTower).
"""

import importlib.util
import sys
import types
import warnings

import ml_collections
import numpy as np
import torch
from torch import nn

from data_pipelines import passt_features

if importlib.util.find_spec("timm") is None:
  for _name in ("timm", "timm.models", "timm.models._hub"):
    sys.modules.setdefault(_name, types.ModuleType(_name))
  sys.modules["timm.models._hub"].download_cached_file = None

from hear21passt.models import passt as hear21_passt  # noqa: E402

hear21_passt.first_RUN = False  # its first forward pass prints every shape
SEGMENT_FRAMES = 1000
IMG_SIZE = (128, 998)  # hear21passt's input size of PaSST-S (frequency, time); shorter or longer inputs are cut


def passt_s(depth: int = 12, seed: int = 0) -> torch.nn.Module:
  """PaSST-S (`passt_s_p16_s16_128_ap468`, patchout 15 time / 2 frequency) with random weights, float64, eval
  mode: `get_model` itself at full depth, its constructor with the same arguments at a reduced `depth`. Biases and
  LayerNorm parameters are randomised too (they start at 0 and 1)."""
  torch.manual_seed(seed)
  if depth == 12:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      model = hear21_passt.get_model(
        arch="passt_s_p16_s16_128_ap468", pretrained=False, fstride=16, tstride=16, input_fdim=128, input_tdim=998,
        s_patchout_t=15, s_patchout_f=2,
      )  # fmt: skip
  else:
    model = hear21_passt.PaSST(
      img_size=IMG_SIZE, patch_size=16, stride=16, in_chans=1, num_classes=527, embed_dim=768, depth=depth,
      num_heads=12, distilled=True, s_patchout_t=15, s_patchout_f=2,
    )  # fmt: skip
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      if name.endswith("bias"):
        parameter.normal_(0.0, 0.02)
      elif name.endswith("weight") and "norm" in name.split(".")[-2]:
        parameter.normal_(1.0, 0.1)
  return model.double().eval()


class FrontEnd(nn.Module):
  """Waveforms (B, L) of full-length clips (no padding) -> normalised log-mel (B, 1, 128, frames): the torch port of
  `passt_features.log_mel` (fixed band FMIN-FMAX in eval mode; in training one random band per batch, fmin = FMIN +
  U{0..9} Hz and fmax = FMAX + 1000 - U{0..1999} Hz, as hear21passt). Runs in float32 (outside any autocast)."""

  def __init__(self):
    super().__init__()
    n = torch.arange(passt_features.WIN_LENGTH, dtype=torch.float64)
    window = 0.5 - 0.5 * torch.cos(2.0 * torch.pi * n / (passt_features.WIN_LENGTH - 1))
    self.register_buffer("window", window.float(), persistent=False)
    self.register_buffer("fixed_banks", self._banks(passt_features.FMIN, passt_features.FMAX), persistent=False)

  @staticmethod
  def _banks(fmin: float, fmax: float) -> torch.Tensor:
    return torch.from_numpy(passt_features.mel_banks(fmin, fmax).astype(np.float32))  # (513, 128)

  def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
    with torch.autocast(waveforms.device.type, enabled=False):
      x = waveforms.float()
      x = x[:, 1:] - passt_features.PREEMPHASIS * x[:, :-1]
      spectrum = torch.stft(
        x, passt_features.N_FFT, passt_features.HOP_LENGTH, passt_features.WIN_LENGTH, self.window,
        center=True, pad_mode="reflect", return_complex=True,
      )  # fmt: skip
      power = spectrum.real**2 + spectrum.imag**2  # (B, 513, frames)
      if self.training:
        fmin = passt_features.FMIN + int(torch.randint(passt_features.FMIN_AUG_RANGE, ()))
        fmax = passt_features.FMAX + passt_features.FMAX_AUG_RANGE // 2
        fmax -= int(torch.randint(passt_features.FMAX_AUG_RANGE, ()))
        banks = self._banks(fmin, fmax).to(power.device)
      else:
        banks = self.fixed_banks
      mel = torch.einsum("bft,fm->bmt", power, banks)
      return ((torch.log(mel + passt_features.LOG_OFFSET) + 4.5) / 5.0)[:, None]


class PasstTower(nn.Module):
  """Waveforms (B, L) -> `FrontEnd` -> hear21passt PaSST's `forward_features` (structured patchout in training) ->
  the mean of its cls and distillation tokens (B, embed_dim): our Passt tower on one 10 s segment per clip (the
  AudioSet heads are not run)."""

  def __init__(self, passt: nn.Module):
    super().__init__()
    self.front_end, self.passt = FrontEnd(), passt

  def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
    features = self.front_end(waveforms)
    if features.shape[-1] > SEGMENT_FRAMES:
      raise ValueError(f"PasstTower embeds one segment of at most {SEGMENT_FRAMES} frames, got {features.shape[-1]}")
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # PatchEmbed warns about every input other than 998 frames
      cls, dist = self.passt.forward_features(features)
    return (cls + dist) / 2


def tower_from_config(audio_config: ml_collections.ConfigDict) -> PasstTower:
  """A randomly initialised PasstTower of `model.audio.passt`'s sizes (float32, hear21passt's initialisation)."""
  sizes = audio_config.passt
  passt = hear21_passt.PaSST(
    img_size=IMG_SIZE, patch_size=16, stride=16, in_chans=1, num_classes=527, embed_dim=sizes.embed_dim,
    depth=sizes.depth, num_heads=sizes.num_heads, mlp_ratio=sizes.mlp_dim / sizes.embed_dim, distilled=True,
    s_patchout_t=sizes.patchout_time, s_patchout_f=sizes.patchout_freq,
  )  # fmt: skip
  return PasstTower(passt)
