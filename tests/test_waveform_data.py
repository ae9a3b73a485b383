"""The waveform audio form (`config.data.audio_feature="waveform"`) end to end on a small Clotho-layout fixture built
here: preparation (records, clips.json, folder, report, feature cache), training batches, evaluation batches, and
the refusal to train on log-mel and waveform sources together."""

import csv
import hashlib
import json
import collections
import os

import numpy as np
import pytest
import soundfile as sf

from data_pipelines import audio_forms, clip_builder, clotho, extraction, features, input_pipeline

HOP = features.HOP_LENGTH
MAX_FRAMES = 40  # 12800 samples: some clips are cropped, some padded.
# file name -> (sample rate, samples, channels); lengths off the hop grid, a stereo file, a resampled one.
GOOD_AUDIO = {
  "development": {
    "d0.wav": (32000, 20011, 1),
    "d1.wav": (44100, 30000, 1),
    "d2.wav": (32000, 9000, 2),
    "d3.wav": (32000, 35555, 1),
    "d4.wav": (32000, 12800, 1),
  },
  "validation": {"v0.wav": (32000, 7001, 1), "v1.wav": (32000, 25000, 1)},
  "evaluation": {"e0.wav": (32000, 16000, 1), "e1.wav": (32000, 3333, 1)},
}
BAD_AUDIO = {"x_broken.wav": "unreadable_audio", "x_short.wav": "too_short"}


def _write_raw(raw_dir: str) -> None:
  rng = np.random.default_rng(7)
  for split, audio in GOOD_AUDIO.items():
    os.makedirs(os.path.join(raw_dir, split))
    rows = []
    for name, (rate, samples, channels) in audio.items():
      # 0.4 sigma: a few samples beyond full scale, which the waveform form clips.
      wave = 0.4 * rng.standard_normal((samples, channels)).astype(np.float32)
      sf.write(os.path.join(raw_dir, split, name), wave, rate, subtype="FLOAT")
      rows.append([name] + [f"caption {k} of {name}" for k in range(2 + len(rows) % 3)])
    if split == "development":
      with open(os.path.join(raw_dir, split, "x_broken.wav"), "wb") as f:
        f.write(b"RIFF not a wav")
      sf.write(os.path.join(raw_dir, split, "x_short.wav"), np.zeros(HOP - 1, np.float32), 32000)
      rows += [[name, f"caption of {name}"] for name in BAD_AUDIO]
    with open(clotho.captions_csv_path(raw_dir, split), "w", newline="", encoding="utf-8") as f:
      writer = csv.writer(f)
      writer.writerow(["file_name"] + [f"caption_{k}" for k in range(1, 6)])
      writer.writerows(row + [""] * (6 - len(row)) for row in rows)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("raw"))
  _write_raw(path)
  return path


@pytest.fixture(scope="module")
def waveform_builder(raw_dir, tmp_path_factory):
  # Two workers: the extraction children get the form too.
  return clotho.prepare(raw_dir, str(tmp_path_factory.mktemp("waveform")), workers=2, audio_feature="waveform")


@pytest.fixture(scope="module")
def log_mel_builder(raw_dir, tmp_path_factory):
  return clotho.prepare(raw_dir, str(tmp_path_factory.mktemp("log_mel")), workers=1)


def _records(builder, split) -> dict[str, dict]:
  return {clip["file_name"].decode(): clip for clip in builder.as_dataset(split=split).as_numpy_iterator()}


def _expected(raw_dir: str, split: str, name: str) -> np.ndarray:
  return audio_forms.WAVEFORM.compute(features.read_audio(os.path.join(raw_dir, split, name))[0])


def test_audio_forms_contract():
  wave = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 1.7, -3.0, 1e-5] * 40, np.float32)
  stored = audio_forms.WAVEFORM.compute(wave)
  assert stored.dtype == np.int16
  np.testing.assert_array_equal(stored[:8], [0, 16384, -16384, 32767, -32767, 32767, -32767, 0])
  np.testing.assert_array_equal(audio_forms.WAVEFORM.to_float32(stored), stored.astype(np.float32) / 32767)
  assert audio_forms.WAVEFORM.frames(HOP) == 1 and audio_forms.WAVEFORM.frames(HOP + 1) == 2
  assert audio_forms.LOG_MEL.frames(7) == 7
  log_mel = audio_forms.LOG_MEL.compute(wave)
  assert log_mel.dtype == np.float16
  np.testing.assert_array_equal(log_mel, features.log_mel(wave).astype(np.float16))
  for form in audio_forms.AUDIO_FORMS.values():
    with pytest.raises(features.AudioError) as error:
      form.compute(np.zeros(HOP - 1, np.float32))
    assert error.value.reason == "too_short"
  with pytest.raises(ValueError, match=r"config\.data\.audio_feature='mel'.*'log_mel', 'waveform'"):
    audio_forms.audio_form("mel")


def test_waveform_records_are_the_clipped_int16_samples(raw_dir, waveform_builder):
  assert "waveform" in waveform_builder.info.features and "log_mel" not in waveform_builder.info.features
  with open(waveform_builder.data_path / clip_builder.CLIPS_FILE, encoding="utf-8") as f:
    table = json.load(f)
  for split, audio in GOOD_AUDIO.items():
    records = _records(waveform_builder, split)
    assert sorted(records) == sorted(audio)
    for name, record in records.items():
      expected = _expected(raw_dir, split, name)
      assert record["waveform"].dtype == np.int16
      np.testing.assert_array_equal(record["waveform"], expected)
    assert "num_frames" not in table[split]
    assert table[split]["num_samples"] == [len(records[name]["waveform"]) for name in sorted(audio)]
  # Some samples were beyond full scale: they are clipped, not wrapped.
  assert any(np.abs(r["waveform"]).max() == 32767 for r in _records(waveform_builder, "development").values())
  frames = input_pipeline.eval_clip_frames(waveform_builder, "development")
  lengths = table["development"]["num_samples"]
  np.testing.assert_array_equal(frames, [-(-n // HOP) for n in lengths])
  assert input_pipeline.longest_clip([(waveform_builder, "development")]) == -(-max(lengths) // HOP)


def test_waveform_has_its_own_folder_and_cache_entries(raw_dir, waveform_builder, log_mel_builder, tmp_path):
  log_mel_dir, waveform_dir = clotho.default_data_dir(raw_dir), clotho.default_data_dir(raw_dir, "waveform")
  assert waveform_dir == log_mel_dir + "-waveform"
  assert clotho.default_data_dir(raw_dir, "log_mel") == log_mel_dir
  with pytest.raises(ValueError, match="'wave'"):
    clotho.default_data_dir(raw_dir, "wave")
  with pytest.raises(ValueError, match="audio_feature='wave'"):
    clotho.Clotho(data_dir=raw_dir, audio_feature="wave")
  for builder, other in ((waveform_builder, "log_mel"), (log_mel_builder, "waveform")):
    with pytest.raises(ValueError, match=f"{builder.data_path} holds {builder.audio_form.name} records, not {other}"):
      clotho.prepare(raw_dir, builder.data_dir_root, audio_feature=other, check_sources=False)
  path = os.path.join(raw_dir, "development", "d0.wav")
  stat = os.stat(path)
  # A prepared clip's log-mel entry is keyed by its split and file name (not where the raw folder lies), size, mtime.
  version = f"{features.FEATURE_VERSION}|silence<{extraction.SILENCE_PEAK}"
  identity = f"development/d0.wav\n{stat.st_size}\n{stat.st_mtime_ns}\n{version}"
  log_mel_entry = os.path.join(log_mel_builder.feature_cache_dir, hashlib.sha1(identity.encode()).hexdigest() + ".npz")
  assert extraction.load_clip(log_mel_entry).dtype == np.float16
  assert extraction.stored_length(log_mel_entry) == features.num_frames(20011)
  waveform_entries = sorted(os.listdir(waveform_builder.feature_cache_dir))
  assert os.path.basename(log_mel_entry) not in waveform_entries
  entry = os.path.join(waveform_builder.feature_cache_dir, waveform_entries[0])
  assert extraction.load_clip(entry).dtype == np.int16
  assert extraction.stored_length(entry) == len(extraction.load_clip(entry))
  # One file, both forms in one cache folder: two entries, each holding its own form.
  outcomes = [extraction.extract(path, str(tmp_path), name) for name in ("log_mel", "waveform")]
  assert outcomes[0].cache_path != outcomes[1].cache_path
  np.testing.assert_array_equal(
    extraction.load_clip(outcomes[1].cache_path), _expected(raw_dir, "development", "d0.wav")
  )


def _report(builder) -> list[list[str]]:
  with open(clip_builder.report_path(builder), encoding="utf-8") as f:
    return list(csv.reader(f))


def test_bad_files_are_skipped_with_the_log_mel_reasons(waveform_builder, log_mel_builder):
  rows = _report(waveform_builder)
  skipped = {row[2]: row[4] for row in rows if row[3] == extraction.SKIPPED_CLIP}
  assert skipped == BAD_AUDIO
  assert rows == _report(log_mel_builder)  # Same skips, reasons, details and notes (downmixed, resampled).
  assert any(row[4] == "resampled" for row in rows) and any(row[4] == "downmixed" for row in rows)
  assert waveform_builder.info.metadata["preparation"] == log_mel_builder.info.metadata["preparation"]


def _offset(clip: np.ndarray, window: np.ndarray) -> int:
  """The unique start of `window` in `clip` (-1 when there is none)."""
  starts = [s for s in range(len(clip) - len(window) + 1) if np.array_equal(clip[s : s + len(window)], window)]
  assert len(starts) <= 1
  return starts[0] if starts else -1


def test_training_batches_crop_the_samples(waveform_builder):
  clips = {int(r["clip_id"]): r["waveform"] for r in _records(waveform_builder, "development").values()}
  batches = list(
    input_pipeline.train_dataset(
      [(waveform_builder, "development")], batch_size=4, max_frames=MAX_FRAMES, seed=5, epoch=0
    ).as_numpy_iterator()
  )
  assert batches
  rows, offsets = MAX_FRAMES * HOP, []
  for batch in batches:
    assert set(batch) == {"waveform", "sample_mask", "caption", "clip_id", "caption_index"}
    assert batch["waveform"].dtype == np.float32 and batch["waveform"].shape == (4, rows)
    assert batch["sample_mask"].dtype == bool and batch["sample_mask"].shape == (4, rows)
    for audio, mask, clip_id in zip(batch["waveform"], batch["sample_mask"], batch["clip_id"], strict=True):
      clip = audio_forms.WAVEFORM.to_float32(clips[int(clip_id)])
      length = min(len(clip), rows)
      np.testing.assert_array_equal(mask, np.arange(rows) < length)
      assert not audio[length:].any()
      offset = _offset(clip, audio[:length])
      assert 0 <= offset <= max(len(clip) - rows, 0)
      offsets.append(offset)
  assert any(offset % HOP for offset in offsets)  # Crops start at any sample, not on the frame grid.


@pytest.mark.parametrize("max_segment", [3000, 40])
def test_evaluation_batches_hold_every_clip_whole_or_in_segments(waveform_builder, max_segment):
  """Waveform segments are cut on the 10 ms frame grid (a segment of n frames holds n * 320 samples, the last the
  rest of the clip), so that PaSST's 10 s segments keep their grid."""
  clips = {int(r["clip_id"]): r["waveform"] for r in _records(waveform_builder, "development").values()}
  seen = collections.Counter()
  for batch in input_pipeline.eval_clip_batches(
    waveform_builder, "development", batch_size=2, max_segment_frames=max_segment
  ):
    assert set(batch) == {"waveform", "sample_mask", "clip_id", "valid", "weight"}
    padded = batch["waveform"].shape[1]
    assert padded % HOP == 0 and padded <= input_pipeline.padded_frames(max_segment) * HOP
    for audio, mask, clip_id, valid in zip(
      batch["waveform"], batch["sample_mask"], batch["clip_id"], batch["valid"], strict=True
    ):
      if not valid:
        assert clip_id == -1 and not mask.any() and not audio.any()
        continue
      clip = clips[int(clip_id)]
      frames = -(-len(clip) // HOP)
      segment = seen[int(clip_id)]
      start, length, _ = input_pipeline.clip_segments(frames, max_segment)[segment]
      samples = audio_forms.WAVEFORM.to_float32(clip)[start * HOP : (start + length) * HOP]
      assert padded == input_pipeline.padded_frames(min(frames, max_segment)) * HOP
      np.testing.assert_array_equal(mask, np.arange(padded) < len(samples))
      np.testing.assert_array_equal(audio[: len(samples)], samples)
      assert not audio[len(samples) :].any()
      seen[int(clip_id)] += 1
  frames = {clip_id: -(-len(clip) // HOP) for clip_id, clip in clips.items()}
  assert seen == {clip_id: len(input_pipeline.clip_segments(n, max_segment)) for clip_id, n in frames.items()}
  assert (max(seen.values()) > 1) == (max_segment == 40)


def test_log_mel_and_waveform_sources_cannot_be_mixed(waveform_builder, log_mel_builder):
  sources = [(log_mel_builder, "development"), (waveform_builder, "development")]
  pattern = f"{log_mel_builder.data_dir}.*{waveform_builder.data_dir}"
  with pytest.raises(ValueError, match=pattern):
    input_pipeline.train_dataset(sources, batch_size=4, max_frames=MAX_FRAMES, seed=0, epoch=0)
  with pytest.raises(ValueError, match=pattern):
    input_pipeline.longest_clip(sources)
