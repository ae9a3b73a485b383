"""The log-mel front end against librosa (SPEC 2) and audio loading (conversions, refusals with their reasons)."""

import struct
import warnings

import librosa
import numpy as np
import pytest
import soundfile as sf

from data_pipelines import features


def _librosa_log_mel(wave):
  mel = librosa.feature.melspectrogram(
    y=wave,
    sr=32000,
    n_fft=1024,
    hop_length=320,
    win_length=1024,
    window="hann",
    center=True,
    pad_mode="reflect",
    power=2.0,
    n_mels=64,
    fmin=50,
    fmax=14000,
  )
  return 10.0 * np.log10(np.maximum(mel, 1e-10)).T


@pytest.mark.parametrize("num_samples", [32000, 32000 * 2 + 123, 5000])
def test_log_mel_matches_librosa_reflect(num_samples):
  rng = np.random.default_rng(num_samples)
  t = np.arange(num_samples) / 32000
  wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 8000) * t) + 0.05 * rng.standard_normal(num_samples)
  wave = wave.astype(np.float32)
  ours = features.log_mel(wave)
  ref = _librosa_log_mel(wave)
  assert ours.shape == ref.shape == (1 + num_samples // 320, 64)
  np.testing.assert_allclose(ours, ref, atol=2e-3)  # dB; ~1e-7 relative in power.
  # Constant padding (librosa >= 0.10 default) gives different edge frames: reflect is really what we match.
  const = librosa.feature.melspectrogram(
    y=wave, sr=32000, n_fft=1024, hop_length=320, center=True, pad_mode="constant", n_mels=64, fmin=50, fmax=14000
  )
  assert np.abs(ours[0] - 10 * np.log10(np.maximum(const[:, 0], 1e-10))).max() > 0.1


def test_frame_counts_and_silence_floor():
  assert features.num_frames(10 * 32000) == 1001 and features.num_frames(30 * 32000) == 3001
  silent = features.log_mel(np.zeros(32000, np.float32))
  assert silent.shape == (101, 64) and silent.min() == silent.max()  # One floor value...
  np.testing.assert_allclose(silent[0, 0], -100.0, rtol=1e-6)  # ...10 log10(1e-10), to float32's log10 ulps.


def test_mel_filterbank_matches_librosa():
  reference = librosa.filters.mel(sr=32000, n_fft=1024, n_mels=64, fmin=50, fmax=14000).T
  ours = features.mel_filterbank()
  assert ours.shape == reference.shape == (513, 64) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("num_samples", [320, 400, 512])
def test_clips_shorter_than_the_padding_match_librosa(num_samples):
  wave = (0.3 * np.random.default_rng(num_samples).standard_normal(num_samples)).astype(np.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # librosa: "n_fft=1024 is too large for input signal".
    reference = _librosa_log_mel(wave)
  np.testing.assert_allclose(features.log_mel(wave), reference, atol=2e-3)


def test_log_mel_rejects_bad_waveforms():
  with pytest.raises(features.AudioError, match="too short") as error:
    features.log_mel(np.ones(features.HOP_LENGTH - 1, np.float32))
  assert error.value.reason == "too_short"
  with pytest.raises(features.AudioError, match="mono"):
    features.log_mel(np.ones((2, 4000), np.float32))


def test_load_audio_resamples_and_downmixes(tmp_path):
  rng = np.random.default_rng(0)
  t = np.arange(44100) / 44100
  left = 0.5 * np.sin(2 * np.pi * 440 * t)
  right = 0.1 * rng.standard_normal(44100)
  path = tmp_path / "stereo_44k.wav"
  sf.write(path, np.stack([left, right], axis=1), 44100, subtype="PCM_16")
  wave = features.load_audio(str(path))
  assert wave.dtype == np.float32 and wave.ndim == 1 and abs(wave.shape[0] - 32000) <= 1
  spectrum = np.abs(np.fft.rfft(wave))
  assert abs(np.argmax(spectrum) * 32000 / wave.shape[0] - 440) < 2  # the tone survives resampling.
  assert np.isclose(np.abs(wave).max(), 0.25 + 0.05 * 3, atol=0.2)  # averaged channels, not summed.


def test_load_audio_errors_name_the_file_and_the_reason(tmp_path):
  broken = tmp_path / "broken.wav"
  broken.write_bytes(b"RIFF\x00\x00not a wav")
  no_samples = tmp_path / "no_samples.wav"
  sf.write(no_samples, np.zeros((0,), np.float32), 32000)
  zero_bytes = tmp_path / "zero_bytes.wav"
  zero_bytes.write_bytes(b"")
  for path, reason in (
    (broken, "unreadable_audio"),
    (no_samples, "empty_file"),
    (zero_bytes, "empty_file"),
    (tmp_path / "absent.wav", "unreadable_audio"),
  ):
    with pytest.raises(features.AudioError, match=path.name) as error:
      features.load_audio(str(path))
    assert error.value.reason == reason


def _truncate(path, keep_fraction=0.6):
  data = path.read_bytes()
  path.write_bytes(data[: int(len(data) * keep_fraction)])


@pytest.mark.parametrize("subtype, rate, channels", [("PCM_16", 44100, 1), ("PCM_24", 32000, 2), ("FLOAT", 16000, 1)])
def test_truncated_wavs_are_refused(tmp_path, subtype, rate, channels):
  path = tmp_path / "clip.wav"
  wave = 0.3 * np.random.default_rng(0).standard_normal((rate, channels))
  sf.write(path, wave, rate, subtype=subtype)
  waveform, source = features.read_audio(str(path))  # Intact: read, and described.
  assert source == features.AudioSource(sample_rate=rate, channels=channels)
  assert abs(len(waveform) - 32000) <= 1
  _truncate(path)
  assert 0 < sf.info(str(path)).frames < rate  # libsndfile alone would read the shorter clip without a word.
  with pytest.raises(features.AudioError, match=rf"clip.wav is truncated: \d+ of the {rate} frames") as error:
    features.read_audio(str(path))
  assert error.value.reason == "truncated_audio"


def test_truncated_flac_is_refused(tmp_path):
  path = tmp_path / "clip.flac"
  sf.write(path, 0.3 * np.random.default_rng(1).standard_normal(44100), 44100, subtype="PCM_16")
  _truncate(path)
  with pytest.raises(features.AudioError, match="clip.flac") as error:
    features.read_audio(str(path))
  assert error.value.reason in ("truncated_audio", "unreadable_audio")


def test_wav_with_extra_chunks_and_unknown_size_is_not_called_truncated(tmp_path):
  """A LIST chunk before the data, and a streaming writer's 0xFFFFFFFF data size, are not truncations."""
  rng = np.random.default_rng(2)
  samples = (0.3 * rng.standard_normal(8000) * 32767).astype("<i2").tobytes()
  fmt = struct.pack("<HHIIHH", 1, 1, 32000, 64000, 2, 16)
  info = b"INFOISFT" + struct.pack("<I", 5) + b"test\x00\x00"  # Odd-sized sub-chunk, padded.
  for data_size in (len(samples), 0xFFFFFFFF):
    body = (
      b"WAVE"
      + b"fmt "
      + struct.pack("<I", len(fmt))
      + fmt
      + b"LIST"
      + struct.pack("<I", len(info))
      + info
      + b"data"
      + struct.pack("<I", data_size)
      + samples
    )
    path = tmp_path / f"clip_{data_size}.wav"
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    waveform, _ = features.read_audio(str(path))
    np.testing.assert_allclose(waveform, np.frombuffer(samples, "<i2") / 32768.0, atol=1e-6)
