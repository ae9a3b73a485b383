"""The signal side of Clotho-Moment-style synthesis (SPEC 12), pure numpy on 32 kHz mono float waveforms.

- `loud_span`: a foreground clip trimmed, at 1 s resolution, to the span from the first to the last 1 s block whose
  mean power is above the clip's mean power - 5 dB (the last block may be shorter than 1 s).
- `place_events`: 1-3 event lengths placed one after another without overlap, each after a gap drawn from an
  exponential of mean `mean_gap_s`; when the gaps and events do not fit in the recording, every gap (the ones before
  each event and the one after the last) is scaled down by the same factor, so the order and relative gaps stay.
  Starts fall on a 0.1 s grid (Clotho-Moment's window precision).
- `procedural_ambience`: a background without silence when no long recordings are given: brown-ish coloured noise
  (1/f^1.5 power) under a slow random gain (between -6 and 0 dB, changing over seconds), a low hum with drifting
  pitch, and sparse texture (short band-passed rustles).
- `mix`: foregrounds scaled to `fg_dB` relative to the background's original RMS, the background attenuated, the sum
  peak-normalised.
"""

import numpy as np

from data_pipelines.features import SAMPLE_RATE

TRIM_BLOCK_S = 1.0
TRIM_BELOW_MEAN_DB = 5.0
WINDOW_GRID_S = 0.1
MIX_PEAK = 1.0
_POWER_FLOOR = 1e-12


def loud_span(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """`waveform` trimmed to its 1 s blocks from the first to the last louder than mean power - 5 dB (all of it
  when it is silent)."""
  block = int(TRIM_BLOCK_S * sample_rate)
  blocks = [waveform[start : start + block] for start in range(0, len(waveform), block)]
  powers = np.array([np.mean(np.square(b, dtype=np.float64)) for b in blocks])
  mean_power = np.mean(np.square(waveform, dtype=np.float64))
  if mean_power <= _POWER_FLOOR:
    return waveform
  loud = np.flatnonzero(
    10 * np.log10(np.maximum(powers, _POWER_FLOOR)) > 10 * np.log10(mean_power) - TRIM_BELOW_MEAN_DB
  )
  return waveform[loud[0] * block : min(len(waveform), (loud[-1] + 1) * block)]


def peak_normalised(waveform: np.ndarray, peak: float = 1.0) -> np.ndarray:
  top = float(np.max(np.abs(waveform)))
  return waveform * (peak / top) if top > 0 else waveform


def rms(waveform: np.ndarray) -> float:
  return float(np.sqrt(np.mean(np.square(waveform, dtype=np.float64))))


def place_events(lengths_s: list[float], duration_s: float, mean_gap_s: float, rng: np.random.Generator) -> list[float]:
  """Start times (s, on the 0.1 s grid) of events of `lengths_s` placed in order without overlap inside
  [0, duration_s]; a ValueError when the events alone (plus 0.1 s each for the grid) do not fit."""
  room = duration_s - float(sum(lengths_s)) - WINDOW_GRID_S * len(lengths_s)
  if room < 0:
    raise ValueError(f"events of {sum(lengths_s):.1f} s do not fit in {duration_s} s")
  gaps = rng.exponential(mean_gap_s, size=len(lengths_s) + 1)
  if gaps.sum() > room:
    gaps *= room / gaps.sum()
  starts, cursor = [], 0.0
  for gap, length in zip(gaps, lengths_s):
    start = round(float(np.ceil((cursor + gap) / WINDOW_GRID_S - 1e-6) * WINDOW_GRID_S), 1)  # Up: < 0.1 s added.
    starts.append(start)
    cursor = start + length
  return starts


def _coloured_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
  """`n` samples of noise whose power falls as 1/f^exponent (above 20 Hz), unit RMS."""
  size = 1 << (n - 1).bit_length()
  freqs = np.fft.rfftfreq(size, 1.0 / SAMPLE_RATE)
  spectrum = np.fft.rfft(rng.standard_normal(size)) / np.maximum(freqs, 20.0) ** (exponent / 2)
  noise = np.fft.irfft(spectrum, size)[:n]
  return noise / rms(noise)


def _slow_curve(rng: np.random.Generator, n: int, seconds_per_point: float) -> np.ndarray:
  """A smooth random curve in [0, 1] of `n` samples, through a random point every `seconds_per_point` s."""
  points = max(2, int(np.ceil(n / SAMPLE_RATE / seconds_per_point)) + 1)
  values = rng.uniform(0.0, 1.0, points)
  x = np.linspace(0, points - 1, n)
  left = np.floor(x).astype(int).clip(0, points - 2)
  t = x - left
  t = t * t * (3 - 2 * t)  # Smoothstep between the points: no corners.
  return values[left] * (1 - t) + values[left + 1] * t


def procedural_ambience(num_samples: int, rng: np.random.Generator) -> np.ndarray:
  """An ambience of `num_samples` samples with no silent stretch (the noise bed is always within 6 dB of its
  level), RMS about 0.1."""
  bed = _coloured_noise(rng, num_samples, rng.uniform(1.2, 1.8))
  bed *= 10 ** (-6.0 * _slow_curve(rng, num_samples, rng.uniform(2.0, 6.0)) / 20)
  hum_hz = rng.uniform(50.0, 120.0) * (1 + 0.02 * (_slow_curve(rng, num_samples, 5.0) - 0.5))
  hum = np.sin(2 * np.pi * np.cumsum(hum_hz) / SAMPLE_RATE) * rng.uniform(0.05, 0.2)
  texture = np.zeros(num_samples)
  for _ in range(rng.poisson(0.5 * num_samples / SAMPLE_RATE)):  # About one rustle every 2 s.
    length = int(rng.uniform(0.02, 0.3) * SAMPLE_RATE)
    start = int(rng.integers(0, max(1, num_samples - length)))
    burst = _coloured_noise(rng, length, 0.0)[: num_samples - start]
    burst *= np.hanning(len(burst)) * rng.uniform(0.2, 0.8)
    texture[start : start + len(burst)] += burst
  return 0.1 * (bed + hum + texture) / rms(bed + hum + texture)


def mix(
  background: np.ndarray,
  foregrounds: list[np.ndarray],
  starts: list[int],
  fg_dbs: list[float],
  background_db: float,
) -> np.ndarray:
  """The peak-normalised float32 mix: each (peak-normalised) foreground scaled to RMS = the background's original
  RMS x 10^(fg_dB/20) and added at its start sample, over the background attenuated by `background_db` dB."""
  reference = rms(background)
  out = background.astype(np.float64) * 10 ** (background_db / 20)
  for foreground, start, fg_db in zip(foregrounds, starts, fg_dbs):
    gain = reference * 10 ** (fg_db / 20) / max(rms(foreground), np.sqrt(_POWER_FLOOR))
    out[start : start + len(foreground)] += gain * foreground
  return peak_normalised(out, MIX_PEAK).astype(np.float32)
