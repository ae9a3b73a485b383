"""Audio loading and the log-mel front end of SPEC section 2 (pure numpy at run time: no librosa, no numba).

`read_audio` decodes any file soundfile understands into 32 kHz mono float32 and says what it converted (channels,
sample rate); it refuses files that are empty, unreadable or truncated (fewer frames decoded than the header
declares). `log_mel` turns such a waveform into the (frames, 64) log-mel matrix of the reference: periodic Hann STFT
(n_fft 1024, hop 320, centred with reflect padding), power spectrum, Slaney mel filterbank 50-14000 Hz,
10*log10(max(mel, 1e-10)). Every refusal is an `AudioError` whose `reason` is a short code for reports.
"""

import dataclasses
import functools
import os
import struct

import numpy as np
import soundfile as sf

SAMPLE_RATE = 32000
N_FFT = 1024
HOP_LENGTH = 320
N_MELS = 64
F_MIN = 50.0
F_MAX = 14000.0
LOG_FLOOR = 1e-10
# Bumped whenever a change above (or in the code below) changes the features of a file: caches key on it.
FEATURE_VERSION = "logmel-32k-1024-320-64-50-14000-v1"

_WAV_PCM_FORMAT_TAGS = (1, 3, 0xFFFE)  # PCM, IEEE float, extensible: block_align bytes hold exactly one frame.
_WAV_UNKNOWN_SIZE = 0x7FFFF000  # Streaming writers put 0 or a huge placeholder in the data chunk size.


class AudioError(ValueError):
  """An audio file or waveform that cannot be turned into features; `reason` is a short code for reports:
  empty_file, unreadable_audio, truncated_audio or too_short."""

  def __init__(self, message: str, reason: str = "unreadable_audio"):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class AudioSource:
  """What a file held before `read_audio` made it 32 kHz mono."""

  sample_rate: int
  channels: int


def _hz_to_slaney_mel(hz: np.ndarray) -> np.ndarray:
  """Slaney's mel scale: linear (3 mels per 200 Hz) below 1 kHz, logarithmic (27 mels per factor 6.4) above."""
  hz = np.asarray(hz, np.float64)
  linear = hz * 3.0 / 200.0
  logarithmic = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * 27.0 / np.log(6.4)
  return np.where(hz >= 1000.0, logarithmic, linear)


def _slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
  mel = np.asarray(mel, np.float64)
  return np.where(mel >= 15.0, 1000.0 * np.exp((mel - 15.0) * np.log(6.4) / 27.0), mel * 200.0 / 3.0)


@functools.cache
def mel_filterbank() -> np.ndarray:
  """(n_fft // 2 + 1, N_MELS) float32 filterbank: triangles on the Slaney mel scale between F_MIN and F_MAX, each
  scaled by 2 / (its bandwidth in Hz) (Slaney normalisation; librosa's `filters.mel` defaults)."""
  edges = _slaney_mel_to_hz(np.linspace(_hz_to_slaney_mel(F_MIN), _hz_to_slaney_mel(F_MAX), N_MELS + 2))
  fft_hz = np.fft.rfftfreq(N_FFT, 1.0 / SAMPLE_RATE)
  lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
  rising = (fft_hz - lower) / (centre - lower)
  falling = (upper - fft_hz) / (upper - centre)
  triangles = np.maximum(0.0, np.minimum(rising, falling))
  return (triangles * (2.0 / (upper - lower))).T.astype(np.float32)


@functools.cache
def _periodic_hann() -> np.ndarray:
  n = np.arange(N_FFT)
  return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)).astype(np.float32)


def num_frames(num_samples: int) -> int:
  """Frames of the centred STFT: 1 + floor(L / hop) (10 s -> 1001)."""
  return 1 + num_samples // HOP_LENGTH


def checked_waveform(waveform: np.ndarray) -> np.ndarray:
  """`waveform` as float32; an AudioError when it is not 1-D, or (reason too_short) shorter than one hop."""
  waveform = np.asarray(waveform, dtype=np.float32)
  if waveform.ndim != 1:
    raise AudioError(f"log_mel expects a mono 1-D waveform, got shape {waveform.shape}")
  if waveform.shape[0] < HOP_LENGTH:
    raise AudioError(
      f"clip of {waveform.shape[0]} samples is too short (needs at least one hop, {HOP_LENGTH} "
      f"samples at {SAMPLE_RATE} Hz)",
      reason="too_short",
    )
  return waveform


def log_mel(waveform: np.ndarray) -> np.ndarray:
  """Log-mel spectrogram (frames, 64) float32 of a mono 32 kHz waveform.

  Raises AudioError when the waveform is not 1-D, or (reason too_short) shorter than one hop (HOP_LENGTH samples).
  Clips shorter than the reflect padding (n_fft / 2) are reflected back and forth, as numpy's and librosa's padding.
  """
  waveform = checked_waveform(waveform)
  padded = np.pad(waveform, N_FFT // 2, mode="reflect")
  frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH]
  spectrum = np.fft.rfft(frames * _periodic_hann(), axis=-1)
  power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
  mel = power @ mel_filterbank()
  return (10.0 * np.log10(np.maximum(mel, LOG_FLOOR))).astype(np.float32)


def _wav_declared_frames(path: str) -> int | None:
  """Frames that a PCM/float WAV's `data` chunk header declares; None for other files or an unknown size.

  libsndfile silently shortens a truncated WAV to the frames present, so the header is read here.
  """
  with open(path, "rb") as f:
    riff = f.read(12)
    if len(riff) < 12 or riff[:4] not in (b"RIFF", b"RIFX") or riff[8:12] != b"WAVE":
      return None
    endian = "<" if riff[:4] == b"RIFF" else ">"
    block_align = None
    while len(header := f.read(8)) == 8:
      chunk_id, size = header[:4], struct.unpack(f"{endian}I", header[4:])[0]
      if chunk_id == b"fmt ":
        fmt = f.read(size)
        if len(fmt) < 14:
          return None
        format_tag, block_align = struct.unpack(f"{endian}H", fmt[:2])[0], struct.unpack(f"{endian}H", fmt[12:14])[0]
        if format_tag not in _WAV_PCM_FORMAT_TAGS or block_align == 0:
          return None
        f.seek(size & 1, os.SEEK_CUR)
      elif chunk_id == b"data":
        if block_align is None or size == 0 or size >= _WAV_UNKNOWN_SIZE:
          return None
        return size // block_align
      else:
        f.seek(size + (size & 1), os.SEEK_CUR)
  return None


def _declared_frames(path: str, info) -> int | None:
  if info.format == "WAV":
    return _wav_declared_frames(path)
  # MP3 without a Xing/LAME header has an estimated length: no truncation check there (decoding errors still count).
  return None if info.format in ("MP3", "MPEG") else info.frames


def read_audio(path: str) -> tuple[np.ndarray, AudioSource]:
  """(32 kHz mono float32 waveform, what the file held) of an audio file: channels averaged, resampled with soxr.

  Raises AudioError (reason empty_file, unreadable_audio or truncated_audio) naming the file.
  """
  try:
    if os.path.getsize(path) == 0:
      raise AudioError(f"audio file {path} is empty (0 bytes)", reason="empty_file")
    info = sf.info(path)
    data, rate = sf.read(path, dtype="float32", always_2d=True)
  except AudioError:
    raise
  except Exception as e:  # soundfile raises several types (LibsndfileError, RuntimeError, TypeError), os OSError.
    raise AudioError(f"cannot read audio file {path}: {e}") from e
  if data.shape[0] == 0:
    raise AudioError(f"audio file {path} holds no samples", reason="empty_file")
  declared = _declared_frames(path, info)
  if declared is not None and data.shape[0] < declared:
    raise AudioError(
      f"audio file {path} is truncated: {data.shape[0]} of the {declared} frames its header declares",
      reason="truncated_audio",
    )
  if not np.isfinite(data).all():
    raise AudioError(f"audio file {path} holds NaN or infinite samples")
  return to_mono_32k(data, rate), AudioSource(sample_rate=rate, channels=data.shape[1])


def to_mono_32k(samples: np.ndarray, rate: float) -> np.ndarray:
  """The 32 kHz mono float32 waveform of float32 `samples` (frames, channels) at `rate` Hz: channels averaged,
  resampled with soxr (what `read_audio` makes of a file)."""
  mono = samples.mean(axis=1)
  if rate != SAMPLE_RATE:
    import soxr  # A dependency of librosa.

    mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
  return mono


def load_audio(path: str) -> np.ndarray:
  """`read_audio`'s waveform alone."""
  return read_audio(path)[0]


def audio_extensions() -> frozenset[str]:
  """Lower-case file extensions (with the dot) of the formats soundfile reads."""
  return frozenset({f".{name.lower()}" for name in sf.available_formats()} | {".oga", ".opus", ".mp3"})
