"""hear21passt's PyTorch PaSST as the test reference of atr_jax.models.passt (import it after
`pytest.importorskip("hear21passt")`): `passt_s` and the loader of hear21passt live in scripts/torch_passt_reference.py
(the benchmark's reference too); `embed` is the tests' clip embedding."""

import warnings

import numpy as np
import torch

from scripts.torch_passt_reference import SEGMENT_FRAMES, passt_s

__all__ = ["SEGMENT_FRAMES", "embed", "passt_s"]


def embed(model: torch.nn.Module, log_mel: np.ndarray) -> np.ndarray:
  """(768,) embedding of one clip's PaSST features (T, 128): hear21passt's `(x[:, 0] + x[:, 1]) / 2` of each
  non-overlapping SEGMENT_FRAMES segment, averaged over the segments (SPEC 11)."""
  x = torch.tensor(log_mel.T[None, None], dtype=torch.float64)
  with torch.no_grad(), warnings.catch_warnings():
    warnings.simplefilter("ignore")  # PatchEmbed warns about every input shorter than 998 frames
    segments = [model(x[..., start : start + SEGMENT_FRAMES])[1] for start in range(0, x.shape[-1], SEGMENT_FRAMES)]
  return torch.cat(segments).mean(0).numpy()
