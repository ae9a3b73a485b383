"""Tests of data_pipelines.synthetic: Clotho layout, captions, wav format, determinism, atomic writes, and that the
attributes the captions name (pitch, count, loudness, sweep direction) are measurable in the written audio."""

import collections
import csv
import os
import re

import numpy as np
import pytest
import soundfile as sf

from data_pipelines import synthetic

SPLITS = ("development", "validation", "evaluation")
SEED = 3
COUNTS = {"development": 60, "validation": 12, "evaluation": 12}
FRAME = 320  # 10 ms at 32 kHz.


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synth") / "clotho")
  synthetic.generate(root, COUNTS, seed=SEED)
  return root


def _rows(root, split):
  with open(os.path.join(root, f"clotho_captions_{split}.csv"), newline="", encoding="utf-8") as f:
    return list(csv.reader(f))


def _clips(root):
  """(spec, captions, float waveform in [-1, 1]) of every clip; specs come from the generator's record."""
  for split in SPLITS:
    for row in _rows(root, split)[1:]:
      index = int(re.fullmatch(rf"synth_{split}_(\d+)\.wav", row[0]).group(1))
      audio, rate = sf.read(os.path.join(root, split, row[0]), dtype="float64")
      assert rate == 32000
      yield synthetic.clip_spec(SEED, split, index), row[1:], audio


def _segments(audio, bridge_frames=3):
  """(start, end) sample ranges where the 10 ms RMS envelope stands out of the floor (short gaps bridged)."""
  frames = audio[: len(audio) // FRAME * FRAME].reshape(-1, FRAME)
  envelope = np.sqrt(np.mean(frames**2, axis=1))
  active = np.flatnonzero(envelope > max(0.07 * envelope.max(), 4 * np.percentile(envelope, 10)))
  segments = []
  for frame in active:
    if segments and frame - segments[-1][1] <= bridge_frames:
      segments[-1][1] = frame + 1
    else:
      segments.append([frame, frame + 1])
  return [(start * FRAME, end * FRAME) for start, end in segments]


def _dominant_hz(x):
  spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
  return np.fft.rfftfreq(len(x), 1 / 32000)[np.argmax(spectrum)]


def test_layout_and_csv_header_match_clotho(dataset):
  expected = {f"clotho_captions_{split}.csv" for split in SPLITS} | set(SPLITS)
  assert set(os.listdir(dataset)) == expected
  for split in SPLITS:
    rows = _rows(dataset, split)
    assert rows[0] == ["file_name", "caption_1", "caption_2", "caption_3", "caption_4", "caption_5"]
    assert len(rows) - 1 == COUNTS[split]
    assert sorted(row[0] for row in rows[1:]) == sorted(os.listdir(os.path.join(dataset, split)))
  assert not [name for name in os.listdir(os.path.dirname(dataset)) if "partial" in name or "old" in name]


def test_five_distinct_captions_naming_pitch_count_and_loudness(dataset):
  pitch_words = {"low": {"low", "deep"}, "mid": {"mid", "medium"}, "high": {"high", "shrill"}}
  count_words = {2: {"two", "pair", "twice"}, 3: {"three", "thrice"}, 4: {"four"}}
  loudness_words = {
    "louder": {"louder", "swelling", "increasing"},
    "quieter": {"quieter", "softer", "fading", "decreasing", "dying"},
    "steady": {"steady", "constant", "unchanging", "even"},
  }
  for spec, captions, _ in _clips(dataset):
    assert len(captions) == 5 and len(set(captions)) == 5 and all(c.strip() for c in captions)
    for caption in captions:
      words = set(re.findall(r"[a-z]+", caption.lower()))
      assert words & loudness_words[spec.loudness], (caption, spec)
      for event in spec.events:
        assert words & pitch_words[event.pitch], (caption, spec)
        assert event.count == 1 or words & count_words[event.count], (caption, spec)


def test_wavs_are_32k_mono_int16_with_varied_lengths_and_peaks(dataset):
  lengths = []
  for split in SPLITS:
    for name in os.listdir(os.path.join(dataset, split)):
      path = os.path.join(dataset, split, name)
      info = sf.info(path)
      assert (info.samplerate, info.channels, info.subtype) == (32000, 1, "PCM_16"), path
      audio, _ = sf.read(path, dtype="int16")
      assert 0.49 * 32767 <= np.abs(audio.astype(np.int32)).max() <= 0.91 * 32767, path
      lengths.append(info.frames / 32000)
  assert 2.5 <= min(lengths) and max(lengths) <= 3.5
  assert len(set(lengths)) > len(lengths) // 2


def test_same_seed_gives_identical_files_and_other_seed_differs(dataset, tmp_path):
  small = {"development": 4, "validation": 2, "evaluation": 2}
  synthetic.generate(str(tmp_path / "same"), small, seed=SEED)
  synthetic.generate(str(tmp_path / "other"), small, seed=SEED + 1)
  for split in SPLITS:
    same_rows, other_rows = _rows(tmp_path / "same", split), _rows(tmp_path / "other", split)
    assert same_rows == _rows(dataset, split)[: small[split] + 1]  # A clip depends only on (seed, split, index).
    assert same_rows[1:] != other_rows[1:]
    for row in same_rows[1:]:
      with open(os.path.join(dataset, split, row[0]), "rb") as a, open(tmp_path / "same" / split / row[0], "rb") as b:
        assert a.read() == b.read()
      with open(tmp_path / "other" / split / row[0], "rb") as c, open(tmp_path / "same" / split / row[0], "rb") as b:
        assert c.read() != b.read()


def test_stated_pitch_is_the_dominant_frequency(dataset):
  bands = {"low": (150, 450), "mid": (600, 1700), "high": (2400, 7000)}
  checked = 0
  for spec, _, audio in _clips(dataset):
    event = spec.events[0]
    if len(spec.events) == 1 and event.kind in ("beep", "buzz", "warble", "knock", "rising whistle", "falling whistle"):
      low, high = bands[event.pitch]
      assert low <= _dominant_hz(audio) <= high, spec
      checked += 1
  assert checked >= 10


def test_stated_counts_match_energy_onsets(dataset):
  checked = 0
  for spec, _, audio in _clips(dataset):
    assert len(_segments(audio)) == sum(event.count for event in spec.events), spec
    checked += 1
  assert checked == sum(COUNTS.values())


def test_stated_loudness_change_matches_event_peaks(dataset):
  checked = 0
  for spec, _, audio in _clips(dataset):
    if len(spec.events) == 1 and spec.events[0].count >= 3:
      peaks = [np.abs(audio[start:end]).max() for start, end in _segments(audio)]
      ratio = peaks[-1] / peaks[0]
      expected = {"louder": (1.3, 10.0), "quieter": (0.1, 1 / 1.3), "steady": (0.75, 1.33)}[spec.loudness]
      assert expected[0] < ratio < expected[1], (spec, ratio)
      checked += 1
  assert checked >= 10


def test_whistle_direction_is_audible(dataset):
  checked = 0
  for spec, _, audio in _clips(dataset):
    kind = spec.events[0].kind
    if len(spec.events) == 1 and kind.endswith("whistle"):
      start, end = _segments(audio)[0]
      third = (end - start) // 3
      rise = _dominant_hz(audio[end - third : end]) / _dominant_hz(audio[start : start + third])
      assert rise > 1.2 if kind == "rising whistle" else rise < 1 / 1.2, (spec, rise)
      checked += 1
  assert checked >= 2


def test_attribute_combinations_are_many_but_single_attributes_shared():
  specs = [synthetic.clip_spec(0, "evaluation", i) for i in range(200)]
  assert len({spec.attributes() for spec in specs}) > 120
  kinds = collections.Counter(event.kind for spec in specs for event in spec.events)
  assert len(kinds) >= 5 and min(kinds.values()) >= 20
  assert min(collections.Counter(spec.loudness for spec in specs).values()) >= 40
  assert {len(spec.events) for spec in specs} == {1, 2}


def test_existing_dataset_needs_overwrite_and_failed_run_leaves_nothing(tmp_path, capsys, monkeypatch):
  out = tmp_path / "data"
  argv = ["--out_dir", str(out), "--num_development", "2", "--num_validation", "1", "--num_evaluation", "1"]
  synthetic.main(argv)
  assert "development: 2 clips" in capsys.readouterr().out
  before = _rows(out, "development")
  with pytest.raises(FileExistsError, match="already exists"):
    synthetic.main(argv)
  synthetic.main(argv + ["--overwrite", "--seed", "5"])
  assert _rows(out, "development") != before
  assert sorted(os.listdir(tmp_path)) == ["data"]

  def broken_make_clip(seed, split, index, duration_s):
    raise RuntimeError("killed")

  monkeypatch.setattr(synthetic, "make_clip", broken_make_clip)
  with pytest.raises(RuntimeError, match="killed"):
    synthetic.generate(str(tmp_path / "fresh"), {"development": 2, "validation": 1, "evaluation": 1})
  assert sorted(os.listdir(tmp_path)) == ["data"]


def test_esc50_layout_has_one_class_per_kind_in_five_folds(tmp_path):
  out = tmp_path / "esc"
  synthetic.main(["--esc50_out", str(out), "--clips_per_fold", "2", "--duration", "1.5", "--seed", "4"])
  assert sorted(os.listdir(out)) == ["audio", "meta"] and os.listdir(out / "meta") == ["esc50.csv"]
  with open(out / "meta" / "esc50.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
  assert collections.Counter((row["category"], row["fold"]) for row in rows) == {
    (kind.replace(" ", "_"), str(fold)): 2 for kind in synthetic.KINDS for fold in range(1, 6)
  }
  assert all(row["category"] == synthetic.KINDS[int(row["target"])].replace(" ", "_") for row in rows)
  assert sorted(row["filename"] for row in rows) == sorted(os.listdir(out / "audio"))
  audio, rate = sf.read(out / "audio" / rows[0]["filename"], dtype="int16")
  assert rate == 32000 and audio.ndim == 1 and len(audio) == 48000
  again = tmp_path / "again"
  synthetic.write_esc50(str(again), clips_per_fold=2, seed=4, duration_s=1.5)
  for row in rows:
    assert (out / "audio" / row["filename"]).read_bytes() == (again / "audio" / row["filename"]).read_bytes()
