"""Audio loading and the log-mel front end of SPEC section 2 (pure numpy; no librosa/numba at run time).

`load_audio` reads any file soundfile understands and returns 32 kHz mono float32; `log_mel` turns such a waveform
into the (frames, 64) log-mel matrix of the reference: periodic Hann STFT (n_fft 1024, hop 320, centred with reflect
padding), power spectrum, Slaney mel filterbank 50-14000 Hz, 10*log10(max(mel, 1e-10)).
"""
import functools

import numpy as np
import soundfile as sf

SAMPLE_RATE = 32000
N_FFT = 1024
HOP_LENGTH = 320
N_MELS = 64
F_MIN = 50.0
F_MAX = 14000.0
LOG_FLOOR = 1e-10


class AudioError(ValueError):
  """An audio file that cannot be turned into features (unreadable, empty, too short)."""


@functools.cache
def mel_filterbank() -> np.ndarray:
  """(n_fft // 2 + 1, N_MELS) Slaney-scale, Slaney-normalised filterbank (librosa's defaults), float32."""
  import librosa  # Only the filterbank comes from librosa; computed once per process.
  return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=F_MIN, fmax=F_MAX).T.astype(np.float32)


@functools.cache
def _periodic_hann() -> np.ndarray:
  n = np.arange(N_FFT)
  return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)).astype(np.float32)


def num_frames(num_samples: int) -> int:
  """Frames of the centred STFT: 1 + floor(L / hop) (10 s -> 1001)."""
  return 1 + num_samples // HOP_LENGTH


def log_mel(waveform: np.ndarray) -> np.ndarray:
  """Log-mel spectrogram (frames, 64) float32 of a mono 32 kHz waveform.

  Raises AudioError when the waveform is not 1-D or too short for reflect padding (<= n_fft / 2 samples).
  """
  waveform = np.asarray(waveform, dtype=np.float32)
  if waveform.ndim != 1:
    raise AudioError(f"log_mel expects a mono 1-D waveform, got shape {waveform.shape}")
  pad = N_FFT // 2
  if waveform.shape[0] <= pad:
    raise AudioError(f"clip of {waveform.shape[0]} samples is too short (needs more than {pad} at {SAMPLE_RATE} Hz)")
  padded = np.pad(waveform, pad, mode="reflect")
  frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH]
  spectrum = np.fft.rfft(frames * _periodic_hann(), axis=-1)
  power = (spectrum.real ** 2 + spectrum.imag ** 2).astype(np.float32)
  mel = power @ mel_filterbank()
  return (10.0 * np.log10(np.maximum(mel, LOG_FLOOR))).astype(np.float32)


def load_audio(path: str) -> np.ndarray:
  """Reads an audio file as float32 mono at 32 kHz (channels averaged, resampled with soxr when needed)."""
  try:
    data, rate = sf.read(path, dtype="float32", always_2d=True)
  except Exception as e:  # soundfile raises several types (LibsndfileError, RuntimeError, TypeError).
    raise AudioError(f"cannot read audio file {path}: {e}") from e
  if data.shape[0] == 0:
    raise AudioError(f"audio file {path} holds no samples")
  mono = data.mean(axis=1)
  if rate != SAMPLE_RATE:
    import soxr  # A dependency of librosa.
    mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
  return mono
