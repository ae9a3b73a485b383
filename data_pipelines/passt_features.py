"""The PaSST front end of SPEC 11 (hear21passt's `AugmentMelSTFT`): waveform -> normalised log-mel (frames, 128).

Pre-emphasis y[n] = x[n] - 0.97 x[n-1] (one sample shorter), centred STFT (n_fft 1024, hop 320, reflect padding of
512 each side; frames = 1 + floor((L - 1) / 320): 10 s -> 1000) with an 800-sample symmetric Hann window
zero-padded to 1024 in the middle, power spectrum, 128 Kaldi mel banks (mel = 1127 ln(1 + f / 700), triangles in
mel between fmin and fmax, no bank on the Nyquist bin), log(mel + 1e-5), then (x + 4.5) / 5.

`log_mel` (numpy, fixed band FMIN-FMAX) is what data preparation and evaluation use, like `features.log_mel` for
CNN14. `log_mel_batch` (JAX) computes a padded batch of waveforms, each clip reflected at its own end so that it
equals `log_mel` of the clip alone; given a `random_band` draw (training only) each clip gets its own band,
fmin = FMIN + U{0..9} Hz and fmax = FMAX + 1000 - U{0..1999} Hz (hear21passt draws one band per batch).
"""

import functools

import numpy as np

from data_pipelines.features import HOP_LENGTH, N_FFT, SAMPLE_RATE, checked_waveform

WIN_LENGTH = 800
N_MELS = 128
PREEMPHASIS = 0.97
FMIN = 0.0
FMIN_AUG_RANGE = 10
FMAX_AUG_RANGE = 2000
FMAX = SAMPLE_RATE / 2 - FMAX_AUG_RANGE / 2  # 15000 Hz
LOG_OFFSET = 1e-5

# The window's 800 taps sit at offset (1024 - 800) / 2 of each 1024-sample frame. A power spectrum does not change
# under a circular shift, so the frames are taken as the 800 samples there, zero-padded to 1024 at the end by rfft.
_WINDOW_OFFSET = (N_FFT - WIN_LENGTH) // 2


def num_frames(num_samples: int) -> int:
  """Frames of a clip of `num_samples` samples: 1 + floor((L - 1) / hop) (10 s -> 1000)."""
  return 1 + (num_samples - 1) // HOP_LENGTH


@functools.cache
def _symmetric_hann() -> np.ndarray:
  n = np.arange(WIN_LENGTH)
  return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / (WIN_LENGTH - 1))).astype(np.float32)


def mel_banks(fmin, fmax, xp=np):
  """(..., n_fft // 2 + 1, N_MELS) Kaldi mel banks (torchaudio's `get_mel_banks` without VTLN, plus a zero row for
  the Nyquist bin) for band edges `fmin`, `fmax` in Hz (scalars, or arrays of shape (...)); `xp` is numpy (float64
  arithmetic) or jax.numpy (traceable edges)."""
  fmin, fmax = xp.asarray(fmin)[..., None, None], xp.asarray(fmax)[..., None, None]
  mel_low, mel_high = 1127.0 * xp.log(1.0 + fmin / 700.0), 1127.0 * xp.log(1.0 + fmax / 700.0)
  delta = (mel_high - mel_low) / (N_MELS + 1)
  bank = xp.arange(N_MELS)[None, :]
  left, centre, right = mel_low + bank * delta, mel_low + (bank + 1) * delta, mel_low + (bank + 2) * delta
  fft_mel = 1127.0 * xp.log(1.0 + xp.arange(N_FFT // 2)[:, None] * (SAMPLE_RATE / N_FFT) / 700.0)
  rising, falling = (fft_mel - left) / (centre - left), (right - fft_mel) / (right - centre)
  banks = xp.maximum(0.0, xp.minimum(rising, falling))
  return xp.concatenate([banks, xp.zeros_like(banks[..., :1, :])], axis=-2)


@functools.cache
def _fixed_banks() -> np.ndarray:
  return mel_banks(FMIN, FMAX).astype(np.float32)


def _log_mel(waveforms, lengths, banks, xp):
  """Normalised log-mel (B, frames, N_MELS) of waveforms (B, L) whose first `lengths` (B,) samples are the clips,
  with mel `banks` (513, N_MELS) or (B, 513, N_MELS). Each clip is reflect-padded at its own ends (repeatedly when
  shorter than the padding, as numpy's reflect mode)."""
  emphasised = waveforms[:, 1:] - PREEMPHASIS * waveforms[:, :-1]
  last = (lengths - 1)[:, None] - 1  # index of each emphasised clip's last sample
  positions = xp.abs(xp.arange(emphasised.shape[1] + N_FFT) - N_FFT // 2)[None, :]
  positions = positions % (2 * last)
  positions = xp.clip(xp.where(positions > last, 2 * last - positions, positions), 0, emphasised.shape[1] - 1)
  padded = xp.take_along_axis(emphasised, positions, axis=1)
  starts = HOP_LENGTH * np.arange(num_frames(waveforms.shape[1]))[:, None] + _WINDOW_OFFSET
  frames = padded[:, starts + np.arange(WIN_LENGTH)[None, :]] * _symmetric_hann()
  spectrum = xp.fft.rfft(frames, n=N_FFT, axis=-1)
  power = spectrum.real**2 + spectrum.imag**2
  return (xp.log(power @ banks + LOG_OFFSET) + 4.5) / 5.0


def log_mel(waveform: np.ndarray) -> np.ndarray:
  """Normalised log-mel (frames, 128) float32 of a mono 32 kHz waveform, with the fixed band FMIN-FMAX.

  Raises AudioError when the waveform is not 1-D, or (reason too_short) shorter than one hop, as `features.log_mel`.
  """
  waveform = checked_waveform(waveform)
  lengths = np.array([waveform.shape[0]])
  return _log_mel(waveform[None], lengths, _fixed_banks(), np).astype(np.float32)[0]


def random_band(rng, batch: int):
  """(fmin, fmax) float32 arrays (batch,) of training's random band edges (JAX `rng`)."""
  import jax

  fmin_rng, fmax_rng = jax.random.split(rng)
  fmin = FMIN + jax.random.randint(fmin_rng, (batch,), 0, FMIN_AUG_RANGE)
  fmax = FMAX + FMAX_AUG_RANGE // 2 - jax.random.randint(fmax_rng, (batch,), 0, FMAX_AUG_RANGE)
  return fmin.astype(np.float32), fmax.astype(np.float32)


def log_mel_batch(waveforms, lengths, band=None):
  """(normalised log-mel (B, frames, 128) float32, frame mask (B, frames) bool) of zero-padded waveforms (B, L)
  holding clips of `lengths` (B,) >= HOP_LENGTH samples, in JAX (jit-compatible). `band` = (fmin, fmax) arrays
  (B,) from `random_band` (training); None uses the fixed band FMIN-FMAX (evaluation)."""
  import jax.numpy as jnp

  waveforms, lengths = jnp.asarray(waveforms, jnp.float32), jnp.asarray(lengths, jnp.int32)
  banks = _fixed_banks() if band is None else mel_banks(*band, xp=jnp).astype(jnp.float32)
  frame_mask = jnp.arange(num_frames(waveforms.shape[1]))[None, :] < (1 + (lengths - 1) // HOP_LENGTH)[:, None]
  return _log_mel(waveforms, lengths, banks, jnp), frame_mask
