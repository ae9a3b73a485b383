"""The log-mel front end against librosa (SPEC 2) and audio loading."""
import librosa
import numpy as np
import pytest
import soundfile as sf

from data_pipelines import features


def _librosa_log_mel(wave):
  mel = librosa.feature.melspectrogram(y=wave, sr=32000, n_fft=1024, hop_length=320, win_length=1024,
                                       window="hann", center=True, pad_mode="reflect", power=2.0, n_mels=64,
                                       fmin=50, fmax=14000)
  return 10.0 * np.log10(np.maximum(mel, 1e-10)).T


@pytest.mark.parametrize("num_samples", [32000, 32000 * 2 + 123, 5000])
def test_log_mel_matches_librosa_reflect(num_samples):
  rng = np.random.default_rng(num_samples)
  t = np.arange(num_samples) / 32000
  wave = (0.3 * np.sin(2 * np.pi * rng.uniform(100, 8000) * t) + 0.05 * rng.standard_normal(num_samples))
  wave = wave.astype(np.float32)
  ours = features.log_mel(wave)
  ref = _librosa_log_mel(wave)
  assert ours.shape == ref.shape == (1 + num_samples // 320, 64)
  np.testing.assert_allclose(ours, ref, atol=2e-3)  # dB; ~1e-7 relative in power.
  # Constant padding (librosa >= 0.10 default) gives different edge frames: reflect is really what we match.
  const = librosa.feature.melspectrogram(y=wave, sr=32000, n_fft=1024, hop_length=320, center=True,
                                         pad_mode="constant", n_mels=64, fmin=50, fmax=14000)
  assert np.abs(ours[0] - 10 * np.log10(np.maximum(const[:, 0], 1e-10))).max() > 0.1


def test_frame_counts_and_silence_floor():
  assert features.num_frames(10 * 32000) == 1001 and features.num_frames(30 * 32000) == 3001
  silent = features.log_mel(np.zeros(32000, np.float32))
  assert silent.shape == (101, 64) and np.all(silent == -100.0)


def test_log_mel_rejects_bad_waveforms():
  with pytest.raises(features.AudioError, match="too short"):
    features.log_mel(np.ones(512, np.float32))
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


def test_load_audio_errors_name_the_file(tmp_path):
  broken = tmp_path / "broken.wav"
  broken.write_bytes(b"RIFF\x00\x00not a wav")
  with pytest.raises(features.AudioError, match="broken.wav"):
    features.load_audio(str(broken))
  empty = tmp_path / "empty.wav"
  sf.write(empty, np.zeros((0,), np.float32), 32000)
  with pytest.raises(features.AudioError, match="empty.wav"):
    features.load_audio(str(empty))
