"""hear21passt's PyTorch PaSST as the test reference of atr_jax.models.passt (import it after
`pytest.importorskip("hear21passt")`).

hear21passt (installed with --no-deps: its torchaudio needs another torch) imports timm only for a download helper;
when timm is absent, empty `timm`, `timm.models` and `timm.models._hub` modules stand in for it (SPEC 11).
"""

import importlib.util
import sys
import types
import warnings

import numpy as np
import torch

if importlib.util.find_spec("timm") is None:
  for _name in ("timm", "timm.models", "timm.models._hub"):
    sys.modules.setdefault(_name, types.ModuleType(_name))
  sys.modules["timm.models._hub"].download_cached_file = None

from hear21passt.models import passt as hear21_passt  # noqa: E402

hear21_passt.first_RUN = False  # its first forward pass prints every shape
SEGMENT_FRAMES = 1000


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
      img_size=(128, 998), patch_size=16, stride=16, in_chans=1, num_classes=527, embed_dim=768, depth=depth,
      num_heads=12, distilled=True, s_patchout_t=15, s_patchout_f=2,
    )  # fmt: skip
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      if name.endswith("bias"):
        parameter.normal_(0.0, 0.02)
      elif name.endswith("weight") and "norm" in name.split(".")[-2]:
        parameter.normal_(1.0, 0.1)
  return model.double().eval()


def embed(model: torch.nn.Module, log_mel: np.ndarray) -> np.ndarray:
  """(768,) embedding of one clip's PaSST features (T, 128): hear21passt's `(x[:, 0] + x[:, 1]) / 2` of each
  non-overlapping SEGMENT_FRAMES segment, averaged over the segments (SPEC 11)."""
  x = torch.tensor(log_mel.T[None, None], dtype=torch.float64)
  with torch.no_grad(), warnings.catch_warnings():
    warnings.simplefilter("ignore")  # PatchEmbed warns about every input shorter than 998 frames
    segments = [model(x[..., start : start + SEGMENT_FRAMES])[1] for start in range(0, x.shape[-1], SEGMENT_FRAMES)]
  return torch.cat(segments).mean(0).numpy()
