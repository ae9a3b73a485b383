"""Preparation of Clotho- and AudioCaps-layout folders (clip_builder, clotho, audiocaps, extraction, datasets, the
prepare CLI) on fixtures made of synthetic clips plus a broken input of every kind, and caption cleaning.

Each fixture row says what must become of it; the tests check that every good clip (a silent one included) is stored
with the log-mel of the front end and all its non-empty captions, that every broken input is in the report with its
reason and nothing else is, that the counts add up, that a preparation killed midway and restarted gives the same
dataset, that a prepared dataset follows its sources (an edited CSV, added or modified audio) without losing
the prepared data to a failed re-preparation, that the default data folder is the dataset's, wherever its raw
folder lies, and that the default folders of a dataset share one feature cache, so that an edited CSV's new folder
decodes nothing it already had.
"""

import collections
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import soundfile as sf

from configs.base import get_base_config
from data_pipelines import audiocaps, captions, clip_builder, clotho, datasets, extraction, features, synthetic

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 7
CLIP_S = 1.0
CLOTHO_HEADER = ["file_name"] + [f"caption_{k}" for k in range(1, 6)] + ["sound_id"]  # sound_id: an extra column.
# Clip-level skip reason of each broken development row (None: kept). The audio of each is made by `_write_audio`.
CLOTHO_BROKEN = {
  "missing.wav": "missing_audio",
  "garbage.wav": "unreadable_audio",
  "truncated.wav": "truncated_audio",
  "zero_bytes.wav": "empty_file",
  "tiny.wav": "too_short",
  "nocaption.wav": "no_caption",
}
# Good development clips in other formats: name -> (sample rate, channels, notes expected).
CLOTHO_CONVERTED = {"stereo_44k.wav": (44100, 2, {"downmixed", "resampled"}), "mono_16k.wav": (16000, 1, {"resampled"})}
CP1252_CAPTION = "a café door – naïvely slammed"


def _synthetic_clip(index: int) -> tuple[list[str], np.ndarray]:
  """(5 captions, int16 32 kHz waveform) of synthetic clip `index`."""
  _, clip_captions, audio = synthetic.make_clip(SEED, "development", index, duration_s=CLIP_S)
  return clip_captions, audio


def _write_audio(path: str, kind: str, index: int) -> None:
  """A wav of `kind`: 'good' (synthetic, 32 kHz), a CLOTHO_CONVERTED name's format, 'silent.wav' (1 s of zeros)
  or a broken kind."""
  _, audio = _synthetic_clip(index)
  if kind == "good":
    sf.write(path, audio, features.SAMPLE_RATE, subtype="PCM_16")
  elif kind in CLOTHO_CONVERTED:
    rate, channels, _ = CLOTHO_CONVERTED[kind]
    wave = np.stack([audio, audio[::-1]], axis=1) if channels == 2 else audio
    sf.write(path, wave, rate, subtype="PCM_16")  # Same samples declared at another rate: a valid, longer clip.
  elif kind == "garbage.wav":
    with open(path, "wb") as f:
      f.write(b"RIFF not really a wav file")
  elif kind == "truncated.wav":
    sf.write(path, audio, 44100, subtype="PCM_16")
    with open(path, "rb") as f:
      data = f.read()
    with open(path, "wb") as f:
      f.write(data[: len(data) // 2])
  elif kind == "zero_bytes.wav":
    open(path, "wb").close()
  elif kind == "tiny.wav":
    sf.write(path, audio[:100], features.SAMPLE_RATE, subtype="PCM_16")
  elif kind == "silent.wav":
    sf.write(path, np.zeros(features.SAMPLE_RATE, np.int16), features.SAMPLE_RATE, subtype="PCM_16")
  elif kind != "missing.wav":
    raise ValueError(kind)


def _csv_line(cells: list[str]) -> str:
  buffer = io.StringIO()
  csv.writer(buffer, lineterminator="\n").writerow(cells)
  return buffer.getvalue()


class ClothoFixture:
  """A Clotho-layout folder and what its preparation must give: `expected[split][file_name]` = stored captions,
  `report` = Counter of (split, item, outcome, reason) rows."""

  def __init__(self, root: str):
    self.root = root
    self.expected = collections.defaultdict(dict)
    self.report = collections.Counter()
    self.decodable = 0  # Unique clips whose audio file exists: each is decoded once by an uncached preparation.
    self._write_development()
    self._write_plain_split("validation", 3)
    self._write_plain_split("evaluation", 2, silent=True)
    self._write_retrieval()

  def _good(self, split: str, name: str, index: int, kind: str = "good") -> list[str]:
    clip_captions, _ = _synthetic_clip(index)
    _write_audio(os.path.join(self.root, split, name), kind, index)
    self.expected[split][name] = clip_captions
    self.decodable += 1
    return clip_captions

  def _write_plain_split(self, split: str, count: int, silent: bool = False) -> None:
    os.makedirs(os.path.join(self.root, split))
    lines = [_csv_line(CLOTHO_HEADER[:-1])]
    for i in range(count):
      name = f"{split}_{i}.wav"
      lines.append(_csv_line([name] + self._good(split, name, 100 + i)))
    if silent:  # Digital silence is valid audio: kept (evaluation ranks every listed clip), with a note.
      name = f"{split}_silent.wav"
      lines.append(_csv_line([name] + self._good(split, name, 150, kind="silent.wav")))
      self.report[(split, name, extraction.NOTE, "silent")] += 1
    with open(clotho.captions_csv_path(self.root, split), "w", encoding="utf-8", newline="") as f:
      f.write("".join(lines))

  def _write_development(self) -> None:
    split, csv_name = "development", "clotho_captions_development.csv"
    os.makedirs(os.path.join(self.root, split))
    lines = [_csv_line(CLOTHO_HEADER).encode("utf-8"), b"\n"]  # The header, then a blank line (not a row).
    self.report[(split, csv_name, extraction.NOTE, "extra_column")] += 1

    def add(cells, encoding="utf-8"):
      lines.append(_csv_line(cells + [str(len(lines))]).encode(encoding))
      return len(lines)  # Its line number.

    for i in range(4):
      add([f"good_{i}.wav"] + self._good(split, f"good_{i}.wav", i))
    for i, (name, (_, _, notes)) in enumerate(CLOTHO_CONVERTED.items()):
      add([name] + self._good(split, name, 10 + i, kind=name))
      self.report.update((split, name, extraction.NOTE, note) for note in notes)
    # Empty cells 2 and 4: the clip keeps its 3 other captions.
    full = self._good(split, "some_empty.wav", 20)
    add(["some_empty.wav", full[0], "", full[2], " ", full[4]])
    self.expected[split]["some_empty.wav"] = [full[0], full[2], full[4]]
    self.report[(split, "some_empty.wav", extraction.SKIPPED_CAPTION, "empty_caption")] += 2
    # A line in cp1252 (the rest of the file is UTF-8).
    full = self._good(split, "cp1252.wav", 21)
    line = add(["cp1252.wav", CP1252_CAPTION] + full[1:], encoding="cp1252")
    self.expected[split]["cp1252.wav"] = [CP1252_CAPTION] + full[1:]
    self.report[(split, f"{csv_name} line {line}", extraction.NOTE, "csv_encoding")] += 1
    for i, (name, reason) in enumerate(CLOTHO_BROKEN.items()):
      _write_audio(os.path.join(self.root, split, name), "good" if name == "nocaption.wav" else name, 30 + i)
      if reason == "no_caption":
        add([name, "", "", "", "", ""])
        self.report[(split, name, extraction.SKIPPED_CAPTION, "empty_caption")] += 5
      else:
        add([name] + [f"caption {k} of {name}" for k in range(5)])
        self.decodable += name != "missing.wav"
      self.report[(split, name, extraction.SKIPPED_CLIP, reason)] += 1
    add(["good_0.wav"] + [f"another caption {k}" for k in range(5)])  # A repeated file name: the first row stays.
    self.report[(split, "good_0.wav", extraction.SKIPPED_CLIP, "duplicate_file_name")] += 1
    line = add(["", "a caption without a file"] + [""] * 4)
    self.report[(split, f"line {line}", extraction.SKIPPED_CAPTION, "empty_caption")] += 4
    self.report[(split, f"line {line}", extraction.SKIPPED_CLIP, "no_file_name")] += 1
    with open(clotho.captions_csv_path(self.root, split), "wb") as f:
      f.write(b"".join(lines))
    self.development_rows = len(lines) - 2

  def _write_retrieval(self) -> None:
    split, folder = "retrieval", os.path.join(self.root, clotho.RETRIEVAL_AUDIO_DIR)
    os.makedirs(folder)
    for i in range(2):
      _write_audio(os.path.join(folder, f"query_clip_{i}.wav"), "good", 200 + i)
      self.expected[split][f"query_clip_{i}.wav"] = []
      self.decodable += 1
    _write_audio(os.path.join(folder, "garbage.wav"), "garbage.wav", 0)
    self.decodable += 1
    with open(os.path.join(folder, "README.txt"), "w") as f:
      f.write("not audio")
    self.report[(split, "garbage.wav", extraction.SKIPPED_CLIP, "unreadable_audio")] += 1
    self.report[(split, "README.txt", extraction.NOTE, "ignored_file")] += 1
    with open(os.path.join(self.root, "retrieval_captions.csv"), "w") as f:
      f.write("caption\na dog barks\n")

  def audio_path(self, split: str, name: str) -> str:
    folder = clotho.RETRIEVAL_AUDIO_DIR if split == "retrieval" else split
    return os.path.join(self.root, folder, name)


AUDIOCAPS_PATTERN = "{youtube_id}_{start_time}.wav"
OFFICIAL_HEADER = ["audiocap_id", "youtube_id", "start_time", "caption"]


class AudioCapsFixture:
  """An AudioCaps-layout folder: train and val in the official format (files named by AUDIOCAPS_PATTERN), test in
  the renamed format."""

  def __init__(self, root: str):
    self.root = root
    self.expected = collections.defaultdict(dict)
    self.report = collections.Counter()
    for split in audiocaps.SPLITS:
      os.makedirs(os.path.join(root, split))
    # (audiocap_id, youtube_id, start_time, caption, audio written?)
    train = [
      (101, "yt_a", 30, "a car passes by", True),
      (102, "yt_b", 0, "people talk", True),
      (103, "yt_b", 0, "a crowd murmurs", True),
      (104, "yt_c", 10, "", True),
      (105, "yt_c", 10, "rain falls on a roof", True),
      (106, "yt_gone", 20, "a dog barks", False),
      (107, "", 5, "a caption without a video", False),
      (108, "yt_b", 40, "a door closes", True),
    ]
    val = [(200 + k, "yt_v", 0, f"caption {k} of yt_v", True) for k in range(5)]
    val += [(210 + k, "yt_w", 60, f"caption {k} of yt_w", False) for k in range(5)]
    for split, rows in (("train", train), ("val", val)):
      self._write_official(split, rows)
    self.report[("train", "yt_c_10.wav", extraction.SKIPPED_CAPTION, "empty_caption")] += 1
    self.report[("train", "yt_gone_20.wav", extraction.SKIPPED_CLIP, "missing_audio")] += 1
    self.report[("train", f"line {1 + 7}", extraction.SKIPPED_CLIP, "no_file_name")] += 1
    self.report[("train", "train.csv", extraction.NOTE, "extra_column")] += 1
    self.report[("val", "yt_w_60.wav", extraction.SKIPPED_CLIP, "missing_audio")] += 1
    self.report[("val", "val.csv", extraction.NOTE, "extra_column")] += 1
    self._write_renamed()

  def _write_official(self, split: str, rows) -> None:
    with open(audiocaps.captions_csv_path(self.root, split), "w", newline="", encoding="utf-8") as f:
      writer = csv.writer(f)
      writer.writerow(OFFICIAL_HEADER + ["source"])
      for audiocap_id, youtube_id, start, caption, present in rows:
        writer.writerow([audiocap_id, youtube_id, start, caption, "youtube"])
        name = AUDIOCAPS_PATTERN.format(youtube_id=youtube_id, start_time=start)
        if present and name not in self.expected[split]:
          _write_audio(os.path.join(self.root, split, name), "good", audiocap_id)
          self.expected[split][name] = []
        if present and caption:
          self.expected[split][name].append(caption)

  def _write_renamed(self) -> None:
    with open(audiocaps.captions_csv_path(self.root, "test"), "w", newline="", encoding="utf-8") as f:
      writer = csv.writer(f)
      writer.writerow(["file_name"] + [f"caption_{k}" for k in range(1, 6)])
      for i in range(2):
        clip_captions = _synthetic_clip(300 + i)[0]
        writer.writerow([f"t{i}.wav"] + clip_captions)
        _write_audio(os.path.join(self.root, "test", f"t{i}.wav"), "good", 300 + i)
        self.expected["test"][f"t{i}.wav"] = clip_captions
      writer.writerow(["t0.wav"] + ["again"] * 5)
      writer.writerow(["t_missing.wav"] + ["lost"] * 5)
    self.report[("test", "t0.wav", extraction.SKIPPED_CLIP, "duplicate_file_name")] += 1
    self.report[("test", "t_missing.wav", extraction.SKIPPED_CLIP, "missing_audio")] += 1


@pytest.fixture(scope="module")
def clotho_raw(tmp_path_factory):
  return ClothoFixture(str(tmp_path_factory.mktemp("clotho_raw")))


@pytest.fixture(scope="module")
def clotho_builder(clotho_raw, tmp_path_factory):
  return clotho.prepare(clotho_raw.root, str(tmp_path_factory.mktemp("clotho_prepared")), workers=2)


@pytest.fixture(scope="module")
def audiocaps_raw(tmp_path_factory):
  return AudioCapsFixture(str(tmp_path_factory.mktemp("audiocaps_raw")))


@pytest.fixture(scope="module")
def audiocaps_cli(audiocaps_raw, tmp_path_factory):
  """(builder, stdout) of the prepare CLI on the AudioCaps fixture."""
  out_dir = str(tmp_path_factory.mktemp("audiocaps_prepared"))
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "data_pipelines.prepare",
      "--dataset=audiocaps",
      f"--raw_dir={audiocaps_raw.root}",
      f"--out_dir={out_dir}",
      f"--audiocaps_file_pattern={AUDIOCAPS_PATTERN}",
      "--workers=1",
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return audiocaps.prepare(audiocaps_raw.root, out_dir, file_pattern=AUDIOCAPS_PATTERN), result.stdout


def _records(builder, split) -> dict[str, dict]:
  return {r["file_name"].decode(): r for r in builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator()}


def _report_rows(builder) -> list[tuple[str, ...]]:
  with open(clip_builder.report_path(builder), newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f))
  assert tuple(rows[0]) == extraction.REPORT_COLUMNS
  return [tuple(row) for row in rows[1:]]


def _check_records(builder, fixture, audio_path) -> None:
  assert set(builder.info.splits) == set(fixture.expected)
  for split, expected in fixture.expected.items():
    records = _records(builder, split)
    assert sorted(records) == sorted(expected), split
    for clip_id, name in enumerate(sorted(expected)):
      record = records[name]
      assert record["clip_id"] == clip_id
      assert [c.decode() for c in record["captions"]] == expected[name]
      reference = features.log_mel(features.load_audio(audio_path(split, name)))
      assert record["log_mel"].dtype == np.float16 and record["log_mel"].shape == reference.shape
      np.testing.assert_allclose(record["log_mel"].astype(np.float32), reference, rtol=2.0**-11 * 1.01, atol=1e-6)


def _check_report(builder, fixture) -> None:
  rows = _report_rows(builder)
  assert {row[0] for row in rows} == {builder.name}
  assert collections.Counter(row[1:5] for row in rows) == fixture.report


def _check_counts_add_up(builder, fixture) -> None:
  counts = builder.info.metadata["preparation"]
  for split, c in counts.items():
    assert c["clips_read"] == c["clips_written"] + sum(c["skipped_clips"].values()), split
    assert c["captions_read"] == c["captions_written"] + sum(c["skipped_captions"].values()), split
    assert c["clips_written"] == builder.info.splits[split].num_examples == len(fixture.expected[split])
    assert c["captions_written"] == sum(len(v) for v in fixture.expected[split].values())
    reported = collections.Counter(
      (reason, outcome) for s, _, outcome, reason in fixture.report.elements() if s == split
    )
    assert c["skipped_clips"] == {r: n for (r, o), n in reported.items() if o == extraction.SKIPPED_CLIP}
    assert c["notes"] == {r: n for (r, o), n in reported.items() if o == extraction.NOTE}


def test_clotho_good_clips_are_stored_with_the_front_end_log_mel(clotho_raw, clotho_builder):
  _check_records(clotho_builder, clotho_raw, clotho_raw.audio_path)
  assert CP1252_CAPTION in [c.decode() for c in _records(clotho_builder, "development")["cp1252.wav"]["captions"]]


def test_clotho_every_broken_input_is_reported_with_its_reason(clotho_raw, clotho_builder):
  _check_report(clotho_builder, clotho_raw)


def test_clotho_counts_add_up(clotho_raw, clotho_builder):
  _check_counts_add_up(clotho_builder, clotho_raw)
  development = clotho_builder.info.metadata["preparation"]["development"]
  assert (development["clips_read"], development["captions_read"]) == (
    clotho_raw.development_rows,
    5 * clotho_raw.development_rows,
  )
  # 5 broken audio files, the repeated and the nameless row take their captions along; 5 + 2 + 4 empty cells.
  assert development["skipped_captions"] == {
    reason: 5 for reason in CLOTHO_BROKEN.values() if reason != "no_caption"
  } | {"duplicate_file_name": 5, "no_file_name": 1, "empty_caption": 11}
  # Kept for the next preparation, one entry per stored clip.
  assert len(os.listdir(clotho_builder.feature_cache_dir)) == sum(len(v) for v in clotho_raw.expected.values())


def test_silent_evaluation_clip_is_kept_and_noted(clotho_builder):
  record = _records(clotho_builder, "evaluation")["evaluation_silent.wav"]
  assert record["log_mel"].shape == (features.num_frames(features.SAMPLE_RATE), features.N_MELS)
  np.testing.assert_allclose(record["log_mel"].astype(np.float32), -100.0, rtol=1e-3)  # The floor, every bin.
  notes = [(row[2], row[4]) for row in _report_rows(clotho_builder) if row[1] == "evaluation"]
  assert notes == [("evaluation_silent.wav", "silent")]


def test_audiocaps_official_and_renamed_csvs(audiocaps_raw, audiocaps_cli):
  builder, _ = audiocaps_cli
  _check_records(builder, audiocaps_raw, lambda split, name: os.path.join(audiocaps_raw.root, split, name))
  _check_report(builder, audiocaps_raw)
  _check_counts_add_up(builder, audiocaps_raw)
  train = builder.info.metadata["preparation"]["train"]
  assert (train["clips_read"], train["captions_read"]) == (6, 8)  # Rows grouped by (youtube_id, start_time).
  assert [c.decode() for c in _records(builder, "train")["yt_b_0.wav"]["captions"]] == [
    "people talk",
    "a crowd murmurs",
  ]


def test_prepare_cli_prints_counts_and_the_report(audiocaps_cli):
  builder, stdout = audiocaps_cli
  assert "  train: 4 clips, 5 captions" in stdout
  assert "audiocaps train: clips 6 read, 4 written, 2 skipped; captions 8 read, 5 written, 3 skipped" in stdout
  assert "  skipped clips: missing_audio 1, no_file_name 1" in stdout
  assert clip_builder.report_path(builder) in stdout
  assert "val: 1 clips, 5 captions" in stdout and "test: 2 clips, 10 captions" in stdout


def test_file_pattern_names_the_files_and_the_builder(tmp_path):
  raw = tmp_path / "raw"
  (raw / "train").mkdir(parents=True)
  with open(raw / "train.csv", "w", newline="") as f:
    csv.writer(f).writerows([OFFICIAL_HEADER, [1, "yt_x", 0, "first"], [2, "yt_x", 30, "second"]])
  for name in ("yt_x.wav", "yt_x_1.wav", "yt_x_2.wav"):
    _write_audio(str(raw / "train" / name), "good", len(name))
  # The default pattern names both clips yt_x.wav: the second group is a repeated file name.
  default = audiocaps.prepare(str(raw), str(tmp_path / "prepared"), workers=1)
  assert [c.decode() for c in _records(default, "train")["yt_x.wav"]["captions"]] == ["first"]
  assert [(r[2], r[4]) for r in _report_rows(default)] == [("yt_x.wav", "duplicate_file_name")]
  by_id = audiocaps.prepare(str(raw), str(tmp_path / "prepared"), file_pattern="yt_x_{audiocap_id:d}.wav", workers=1)
  assert by_id.data_path != default.data_path and by_id.data_path.parent.parent == default.data_path.parent.parent
  assert {name: [c.decode() for c in r["captions"]] for name, r in _records(by_id, "train").items()} == {
    "yt_x_1.wav": ["first"],
    "yt_x_2.wav": ["second"],
  }
  assert _report_rows(by_id) == []
  # Preparing again with the first pattern serves the first preparation: each pattern has its own folder.
  again = audiocaps.prepare(str(raw), str(tmp_path / "prepared"), workers=1)
  assert again.data_path == default.data_path and again.is_prepared()


@pytest.mark.parametrize("pattern", ["{video}.wav", "{youtube_id", "{start_time}.wav", "clip.wav"])
def test_bad_file_pattern_is_a_clear_error(pattern):
  with pytest.raises(ValueError, match="config.data.audiocaps_file_pattern"):
    audiocaps.AudioCaps.config_for(pattern)


@pytest.mark.parametrize(
  "dataset, file_name, header, missing",
  [
    ("clotho", "clotho_captions_development.csv", ["name", "caption_1"], "'file_name'"),
    ("clotho", "clotho_captions_development.csv", ["file_name", "description"], "'caption_1'"),
    ("audiocaps", "train.csv", ["audiocap_id", "youtube_id", "caption"], "'start_time'"),
    ("audiocaps", "val.csv", ["id", "caption"], "'youtube_id'.*or 'file_name'"),
  ],
)
def test_missing_column_is_a_clear_error(tmp_path, dataset, file_name, header, missing):
  raw = tmp_path / "raw"
  raw.mkdir()
  with open(raw / file_name, "w", newline="") as f:
    csv.writer(f).writerows([header, ["a.wav", "a caption", "x"]])
  with pytest.raises(ValueError, match=rf"{file_name}: required column {missing}"):
    datasets.prepare(dataset, str(raw), str(tmp_path / "prepared"))
  assert not list((tmp_path / "prepared").glob(f"{dataset}/**/dataset_info.json"))


def _small_clotho(root) -> str:
  """A synthetic Clotho-layout folder of 2 + 1 + 1 clips of 1.5 s."""
  raw = str(root / "raw")
  synthetic.generate(raw, {"development": 2, "validation": 1, "evaluation": 1}, seed=SEED, duration_s=1.5)
  return raw


def _prepare_counting(prepare, monkeypatch, caplog) -> tuple[clip_builder.CaptionedClips, list[str], str]:
  """(builder, audio files decoded, log) of `prepare()` (in this process: workers=1)."""
  decoded = []
  read_audio = features.read_audio
  monkeypatch.setattr(features, "read_audio", lambda path: decoded.append(os.path.basename(path)) or read_audio(path))
  caplog.clear()
  with caplog.at_level("INFO"):
    builder = prepare()
  monkeypatch.setattr(features, "read_audio", read_audio)
  return builder, decoded, caplog.text


def test_edited_caption_csv_is_prepared_again_from_the_cache(tmp_path, monkeypatch, caplog):
  raw, data_dir = _small_clotho(tmp_path), str(tmp_path / "prepared")
  prepare = lambda: clotho.prepare(raw, data_dir, workers=1)
  first, decoded, _ = _prepare_counting(prepare, monkeypatch, caplog)
  assert len(decoded) == 4
  path = clotho.captions_csv_path(raw, "development")
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f))
  rows[1][2] = "an edited caption"
  with open(path, "w", newline="", encoding="utf-8") as f:
    csv.writer(f).writerows(rows)
  again, decoded, log = _prepare_counting(prepare, monkeypatch, caplog)
  assert "clotho: sources changed since preparation (clotho_captions_development.csv edited): preparing again" in log
  assert decoded == []  # Every clip's features came from the cache.
  assert again.data_path == first.data_path
  assert [c.decode() for c in _records(again, "development")[rows[1][0]]["captions"]] == rows[1][1:]
  assert not [p.name for p in again.data_path.parent.iterdir() if p.name not in (again.data_path.name, "feature_cache")]


def test_modified_audio_alone_is_extracted_again(tmp_path, monkeypatch, caplog):
  raw, data_dir = _small_clotho(tmp_path), str(tmp_path / "prepared")
  prepare = lambda: clotho.prepare(raw, data_dir, workers=1)
  first, _, _ = _prepare_counting(prepare, monkeypatch, caplog)
  name = sorted(_records(first, "development"))[0]
  _write_audio(os.path.join(raw, "development", name), "good", 99)  # Another clip, 1 s instead of 1.5 s.
  again, decoded, log = _prepare_counting(prepare, monkeypatch, caplog)
  assert "clotho: sources changed since preparation (1 audio file modified): preparing again" in log
  assert decoded == [name]
  stored = _records(again, "development")[name]["log_mel"]
  reference = features.log_mel(features.load_audio(os.path.join(raw, "development", name)))
  np.testing.assert_allclose(stored.astype(np.float32), reference, rtol=2.0**-11 * 1.01, atol=1e-6)
  assert len(os.listdir(again.feature_cache_dir)) == 4  # The old clip's entry is gone.


def test_newly_downloaded_audio_is_prepared_again(tmp_path, monkeypatch, caplog):
  raw = tmp_path / "raw"
  (raw / "train").mkdir(parents=True)
  with open(raw / "train.csv", "w", newline="") as f:
    csv.writer(f).writerows([OFFICIAL_HEADER, [1, "yt_a", 0, "a car passes"], [2, "yt_b", 0, "a dog barks"]])
  _write_audio(str(raw / "train" / "yt_a.wav"), "good", 1)
  prepare = lambda: audiocaps.prepare(str(raw), str(tmp_path / "prepared"), workers=1)
  first, _, _ = _prepare_counting(prepare, monkeypatch, caplog)
  assert sorted(_records(first, "train")) == ["yt_a.wav"]
  _write_audio(str(raw / "train" / "yt_b.wav"), "good", 2)
  again, decoded, log = _prepare_counting(prepare, monkeypatch, caplog)
  assert "audiocaps: sources changed since preparation (1 audio file added): preparing again" in log
  assert decoded == ["yt_b.wav"]
  assert {name: [c.decode() for c in r["captions"]] for name, r in _records(again, "train").items()} == {
    "yt_a.wav": ["a car passes"],
    "yt_b.wav": ["a dog barks"],
  }
  assert again.info.metadata["preparation"]["train"]["skipped_clips"] == {}


def _clotho_paths(root: str, layout: str) -> list[str]:
  """Each Clotho split's caption CSV and audio folder in `layout` under `root` (as tests/test_layouts.py spells
  them), in split order."""
  theirs = dict(zip(clotho.SPLITS, ("train", "val", "test")))
  paths = {
    "native": lambda split: (f"clotho_captions_{split}.csv", split),
    "aac-datasets": lambda split: (
      f"CLOTHO_v2.1/clotho_csv_files/clotho_captions_{split}.csv",
      f"CLOTHO_v2.1/clotho_audio_files/{split}",
    ),
    "reference": lambda split: (f"csv_files/{theirs[split]}.csv", f"waveforms/{theirs[split]}"),
  }[layout]
  return [os.path.join(root, path) for split in clotho.SPLITS for path in paths(split)]


def _relayout(sources: list[str], targets: list[str], copy: bool) -> None:
  """Each of `sources` moved (os.renames) or, when `copy`, copied (shutil.copy2 / copytree) to its target: either
  way the files keep their modification times."""
  for source, target in zip(sources, targets, strict=True):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if not copy:
      os.renames(source, target)
    elif os.path.isdir(source):
      shutil.copytree(source, target)
    else:
      shutil.copy2(source, target)


def _default_folder_config(tmp_path, monkeypatch):
  """A data config of the synthetic Clotho-layout dataset, generated into tmp_path/raw on first use, with no
  data_dir (the default one, under a home folder in tmp_path) and its clips decoded in this process (counted by
  `_prepare_counting`)."""
  monkeypatch.setenv("HOME", str(tmp_path / "home"))  # The root of the default folders, ~/.cache/atr_jax/prepared.
  monkeypatch.setattr(extraction, "default_workers", lambda: 1)
  config = get_base_config().data
  config.update(raw_dir=str(tmp_path / "raw"), data_dir="", generate_synthetic=True)
  config.synthetic.update(num_development=2, num_validation=1, num_evaluation=1, duration_s=1.5, seed=SEED)
  return config


def _check_same_records(builder, expected: dict, changed: str = "") -> None:
  assert set(builder.info.splits) == set(expected)
  for split, records in expected.items():
    found = _records(builder, split)
    assert sorted(found) == sorted(records)
    for name, record in found.items():
      assert (
        list(record["captions"]) == list(records[name]["captions"]) and record["clip_id"] == records[name]["clip_id"]
      )
      if name != changed:
        np.testing.assert_array_equal(record["log_mel"], records[name]["log_mel"])


def test_a_moved_or_re_laid_out_raw_folder_is_prepared_from_the_cache(tmp_path, monkeypatch, caplog):
  """The feature cache knows a clip by split, file name, size and modification time, not by where the folder lies:
  the same folder moved elsewhere in the aac-datasets layout, then copied into the reference layout, is prepared
  again (its paths changed) without decoding a clip, into the same records; a file whose content changed in the copy
  is decoded again, alone."""
  raw, data_dir = _small_clotho(tmp_path), str(tmp_path / "prepared")
  first, decoded, _ = _prepare_counting(lambda: clotho.prepare(raw, data_dir, workers=1), monkeypatch, caplog)
  assert len(decoded) == 4
  expected = {split: _records(first, split) for split in clotho.SPLITS}

  aac = str(tmp_path / "elsewhere" / "clotho")
  _relayout(_clotho_paths(raw, "native"), _clotho_paths(aac, "aac-datasets"), copy=False)
  assert not os.path.exists(os.path.join(raw, "development"))  # moved, not copied
  moved, decoded, log = _prepare_counting(lambda: clotho.prepare(aac, data_dir, workers=1), monkeypatch, caplog)
  assert "preparing again" in log
  assert decoded == []
  _check_same_records(moved, expected)

  reference = str(tmp_path / "data" / "Clotho")
  _relayout(_clotho_paths(aac, "aac-datasets"), _clotho_paths(reference, "reference"), copy=True)
  copied, decoded, log = _prepare_counting(lambda: clotho.prepare(reference, data_dir, workers=1), monkeypatch, caplog)
  assert "preparing again" in log
  assert decoded == []
  _check_same_records(copied, expected)

  name = sorted(expected["development"])[0]
  path = os.path.join(reference, "waveforms", "train", name)
  _write_audio(path, "good", 99)  # Another clip, 1 s instead of 1.5 s.
  changed, decoded, _ = _prepare_counting(lambda: clotho.prepare(reference, data_dir, workers=1), monkeypatch, caplog)
  assert decoded == [name]
  _check_same_records(changed, expected, changed=name)
  np.testing.assert_allclose(
    _records(changed, "development")[name]["log_mel"].astype(np.float32),
    features.log_mel(features.load_audio(path)),
    rtol=2.0**-11 * 1.01,
    atol=1e-6,
  )


@pytest.mark.slow
def test_the_default_data_folder_follows_the_dataset_not_its_path(tmp_path, monkeypatch, caplog):
  """With config.data.data_dir empty, the prepared folder and its feature cache are named after the content of the
  raw folder's caption CSVs, not after where it lies: the raw folder generated and prepared on first use, then moved
  elsewhere and trained from under its new raw_dir, is found prepared (nothing prepared, nothing decoded); moved
  into another layout, it is prepared again into the same folder without decoding a clip; an edited caption CSV
  makes a dataset of its own, prepared into a folder of its own from the shared feature cache (the other one, left as
  it was, is logged)."""
  config = _default_folder_config(tmp_path, monkeypatch)
  prepare = lambda: datasets.prepare_builder(config)
  first, decoded, _ = _prepare_counting(prepare, monkeypatch, caplog)
  assert len(decoded) == 4
  root = str(tmp_path / "home" / ".cache" / "atr_jax" / "prepared")
  assert os.path.dirname(os.fspath(first.data_dir_root)) == root
  expected = {split: _records(first, split) for split in first.info.splits}
  info_file = os.fspath(first.data_path / "dataset_info.json")
  written = os.stat(info_file).st_mtime_ns

  config.raw_dir = str(tmp_path / "elsewhere" / "clotho")
  os.renames(tmp_path / "raw", config.raw_dir)
  moved, decoded, log = _prepare_counting(prepare, monkeypatch, caplog)
  assert decoded == [] and "Preparing" not in log and "preparing again" not in log
  assert moved.data_path == first.data_path and os.stat(info_file).st_mtime_ns == written  # Not rewritten.
  _check_same_records(moved, expected)

  aac = str(tmp_path / "aac" / "clotho")
  _relayout(_clotho_paths(config.raw_dir, "native"), _clotho_paths(aac, "aac-datasets"), copy=False)
  config.raw_dir = aac
  relaid, decoded, log = _prepare_counting(prepare, monkeypatch, caplog)
  assert "preparing again" in log and decoded == []
  assert relaid.data_path == first.data_path
  _check_same_records(relaid, expected)

  path = clotho.captions_csv_path(aac, "development")
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f))
  rows[1][2] = "an edited caption"
  with open(path, "w", newline="", encoding="utf-8") as f:
    csv.writer(f).writerows(rows)
  edited, decoded, log = _prepare_counting(prepare, monkeypatch, caplog)
  assert os.path.dirname(os.fspath(edited.data_dir_root)) == root and edited.data_dir_root != first.data_dir_root
  assert decoded == []  # A folder of its own, prepared from the feature cache the default folders share.
  assert "these prepared clotho folders are not used for it (" in log and os.fspath(first.data_dir_root) in log
  assert [c.decode() for c in _records(edited, "development")[rows[1][0]]["captions"]] == rows[1][1:]
  _check_same_records(clotho.prepare(aac, os.fspath(first.data_dir_root), check_sources=False), expected)


@pytest.mark.slow
def test_two_copies_share_the_default_folder_and_each_change_prepares_it_again(tmp_path, monkeypatch, caplog):
  """Two copies of a raw folder with the same caption CSVs share the default folder: a copy made with the files'
  modification times is found prepared by the prepare command, and when one copy's audio changes, each copy
  prepared in turn prepares the shared folder again into its own records (the other copy's are never mixed in)."""
  config = _default_folder_config(tmp_path, monkeypatch)
  first = datasets.prepare_builder(config)
  expected = {split: _records(first, split) for split in first.info.splits}
  copy = str(tmp_path / "copy")
  shutil.copytree(config.raw_dir, copy)  # With each file's modification time, as `cp -a`.
  result = subprocess.run(
    [sys.executable, "-m", "data_pipelines.prepare", f"--raw_dir={copy}", "--workers=1"],
    cwd=REPO_ROOT,
    env=os.environ | {"HOME": str(tmp_path / "home")},
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"clotho prepared in {first.data_path}\n" in result.stdout
  assert "Preparing" not in result.stderr and "preparing again" not in result.stderr

  name = sorted(expected["development"])[0]
  _write_audio(os.path.join(copy, "development", name), "good", 99)  # Another clip, 1 s instead of 1.5 s.
  original = config.raw_dir
  config.raw_dir = copy
  changed, decoded, log = _prepare_counting(lambda: datasets.prepare_builder(config), monkeypatch, caplog)
  assert "1 audio file modified" in log and decoded == [name] and changed.data_path == first.data_path
  _check_same_records(changed, expected, changed=name)
  assert len(_records(changed, "development")[name]["log_mel"]) != len(expected["development"][name]["log_mel"])
  config.raw_dir = original
  back, decoded, log = _prepare_counting(lambda: datasets.prepare_builder(config), monkeypatch, caplog)
  assert "1 audio file modified" in log and decoded == [name] and back.data_path == first.data_path
  _check_same_records(back, expected)


def _edit_first_caption(raw_dir: str, text: str) -> tuple[str, list[str]]:
  """(file name, captions) of the first development row of the Clotho CSV in `raw_dir`, its caption_2 set to
  `text` (the CSV rewritten)."""
  path = clotho.captions_csv_path(raw_dir, "development")
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f))
  rows[1][2] = text
  with open(path, "w", newline="", encoding="utf-8") as f:
    csv.writer(f).writerows(rows)
  return rows[1][0], rows[1][1:]


def _captions(builder, split: str, name: str) -> list[str]:
  return [c.decode() for c in _records(builder, split)[name]["captions"]]


def test_an_edited_caption_csv_gets_a_default_folder_prepared_from_the_shared_cache(tmp_path, monkeypatch, caplog):
  """The default folders of a dataset and audio form share one feature cache (PREPARED_ROOT/feature_cache/clotho):
  an edited caption makes a new default folder, prepared without decoding a clip, holding the edited caption. The
  cache keeps the entries of every default folder on disk: after one clip changed, each of the two folders used in
  turn decodes it once between them (the old entry stays while the first folder lists it, and goes once neither
  does); a deleted folder gives its entries up at the next preparation of another."""
  config = _default_folder_config(tmp_path, monkeypatch)
  prepare = lambda: datasets.prepare_builder(config)
  root = str(tmp_path / "home" / ".cache" / "atr_jax" / "prepared")
  shared = os.path.join(root, "feature_cache", "clotho")
  first, decoded, _ = _prepare_counting(prepare, monkeypatch, caplog)
  assert len(decoded) == 4
  csv_path = clotho.captions_csv_path(config.raw_dir, "development")
  with open(csv_path, "rb") as f:
    original_csv = f.read()

  name, captions = _edit_first_caption(config.raw_dir, "an edited caption")
  edited, decoded, log = _prepare_counting(prepare, monkeypatch, caplog)
  assert edited.data_dir_root != first.data_dir_root and decoded == []
  assert _captions(edited, "development", name) == captions and "an edited caption" in captions
  assert first.feature_cache_dir == edited.feature_cache_dir == shared
  assert os.fspath(first.data_dir_root) in log and f"'{os.path.dirname(shared)}'" not in log  # Not a data folder.
  assert len(os.listdir(shared)) == 4

  changed = sorted(_records(first, "development"))[1]
  _write_audio(os.path.join(config.raw_dir, "development", changed), "good", 99)  # Another clip, 1 s.
  edited, decoded, log = _prepare_counting(prepare, monkeypatch, caplog)
  assert "1 audio file modified" in log and decoded == [changed]
  assert len(os.listdir(shared)) == 5  # The first folder still lists the clip's old entry.

  with open(csv_path, "wb") as f:
    f.write(original_csv)  # Back to the first folder, whose records hold the old clip: staged from the cache.
  back, decoded, log = _prepare_counting(prepare, monkeypatch, caplog)
  assert back.data_path == first.data_path and "1 audio file modified" in log and decoded == []
  assert _captions(back, "development", name) != captions
  assert len(os.listdir(shared)) == 4  # Neither folder lists the old entry.

  shutil.rmtree(edited.data_dir_root)
  other = sorted(_records(first, "development"))[0]
  _write_audio(os.path.join(config.raw_dir, "development", other), "good", 98)
  again, decoded, _ = _prepare_counting(prepare, monkeypatch, caplog)
  assert again.data_path == first.data_path and decoded == [other]
  listed = json.loads((again.data_path / clip_builder.CACHE_ENTRIES_FILE).read_text())
  assert sorted(os.listdir(shared)) == sorted(listed) and len(listed) == 4


def test_only_default_folders_share_the_feature_cache(tmp_path, monkeypatch):
  """A default folder's cache is the one of its dataset and audio form; a folder named by the user (even under the
  default root) keeps its cache beside its version folder."""
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  raw = _small_clotho(tmp_path)
  root = str(tmp_path / "home" / ".cache" / "atr_jax" / "prepared")
  for form, suffix in (("log_mel", ""), ("waveform", "-waveform")):
    default = clotho.Clotho(data_dir=datasets.default_data_dir("clotho", raw, form), audio_feature=form)
    assert default.feature_cache_dir == os.path.join(root, "feature_cache", f"clotho{suffix}")
  for data_dir in (str(tmp_path / "mine"), os.path.join(root, "mine"), os.path.join(root, "clotho-0123456789ab-x")):
    own = clotho.Clotho(data_dir=data_dir)
    assert own.feature_cache_dir == os.fspath(own.data_path.parent / "feature_cache")


def test_a_moved_wavcaps_folder_keeps_its_default_folder_and_its_exclusion_list(tmp_path, monkeypatch, caplog):
  """WavCaps with its exclusion list kept beside the raw folder (not in it): the raw folder moved finds its default
  folder prepared, the list, which stayed where it was, being the same source wherever the raw folder lies."""
  import test_wavcaps  # Its WavCaps-layout fixture writers.

  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  raw, exclude_csv = str(tmp_path / "WavCaps"), str(tmp_path / "blacklist_clotho.full.csv")
  test_wavcaps._write_wavcaps(raw)
  test_wavcaps._write_exclusions(exclude_csv, test_wavcaps.EXCLUDED_IDS)

  def prepare(raw_dir: str):
    data_dir = datasets.default_data_dir("wavcaps", raw_dir, "log_mel")
    return datasets.prepare("wavcaps", raw_dir, data_dir, wavcaps_exclude_csv=exclude_csv, workers=1)

  first, decoded, _ = _prepare_counting(lambda: prepare(raw), monkeypatch, caplog)
  assert sorted(_records(first, "train")) == sorted(test_wavcaps.EXPECTED)
  moved_raw = str(tmp_path / "moved" / "WavCaps")
  os.renames(raw, moved_raw)
  moved, decoded, log = _prepare_counting(lambda: prepare(moved_raw), monkeypatch, caplog)
  assert decoded == [] and "Preparing" not in log and "preparing again" not in log
  assert moved.data_path == first.data_path
  assert sorted(_records(moved, "train")) == sorted(test_wavcaps.EXPECTED)


def test_the_default_data_folder_needs_the_raw_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nowhere does not exist: the default prepared folder is named after"):
    datasets.default_data_dir("clotho", str(tmp_path / "nowhere"), "log_mel")


def test_unchanged_sources_are_reused_without_extraction(tmp_path, monkeypatch, caplog):
  raw, data_dir = _small_clotho(tmp_path), str(tmp_path / "prepared")
  first = clotho.prepare(raw, data_dir, workers=1)
  info_file = os.fspath(first.data_path / "dataset_info.json")
  written = os.stat(info_file).st_mtime_ns

  def fail(path):
    raise AssertionError(f"prepare decoded {path}")

  monkeypatch.setattr(features, "read_audio", fail)
  again, _, log = _prepare_counting(lambda: clotho.prepare(raw, data_dir, workers=1), monkeypatch, caplog)
  assert "preparing again" not in log and "Preparing" not in log
  assert again.data_path == first.data_path and os.stat(info_file).st_mtime_ns == written  # Not rewritten.


def test_failed_re_preparation_keeps_the_prepared_dataset(tmp_path, monkeypatch):
  raw, data_dir = _small_clotho(tmp_path), str(tmp_path / "prepared")
  first = clotho.prepare(raw, data_dir, workers=1)
  before = {split: _records(first, split).keys() for split in first.info.splits}
  os.remove(os.path.join(raw, "evaluation", sorted(before["evaluation"])[0]))

  def fail(cache_path):
    raise RuntimeError("killed while writing")

  monkeypatch.setattr(extraction, "load_clip", fail)
  with pytest.raises(RuntimeError, match="killed while writing"):
    clotho.prepare(raw, data_dir, workers=1)
  # The other processes of a job take process 0's dataset as it is.
  kept = clotho.prepare(raw, data_dir, workers=1, check_sources=False)
  assert {split: _records(kept, split).keys() for split in kept.info.splits} == before
  # A replacement cut short between its two renames: the old dataset comes back, and is then replaced.
  os.rename(first.data_path, first.data_path.parent / f"replaced-{first.data_path.name}")
  monkeypatch.undo()
  assert clotho.prepare(raw, data_dir, workers=1, check_sources=False).info.splits.keys() == before.keys()
  redone = clotho.prepare(raw, data_dir, workers=1)
  assert set(redone.info.splits) == {"development", "validation"}  # The evaluation split's one clip is gone.
  assert sorted(p.name for p in redone.data_path.parent.iterdir()) == [redone.data_path.name, "feature_cache"]


def _env_with_sitecustomize(folder, code: str) -> dict:
  """Environment whose Python processes (the preparation and its worker processes alike) first run `code`."""
  (folder / "sitecustomize.py").write_text(textwrap.dedent(code))
  return dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), REPO_ROOT]))


_SLOW_LOG_MEL = """
    import time
    from data_pipelines import features

    _log_mel = features.log_mel

    def slow_log_mel(waveform):
      time.sleep(0.3)
      return _log_mel(waveform)

    features.log_mel = slow_log_mel
"""


@pytest.mark.slow
def test_killed_preparation_restarts_where_it_stopped(clotho_raw, clotho_builder, tmp_path, monkeypatch):
  data_dir = tmp_path / "prepared"
  cache_dir = data_dir / "clotho" / "feature_cache"
  (tmp_path / "site").mkdir()
  child = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "data_pipelines.prepare",
      f"--raw_dir={clotho_raw.root}",
      f"--out_dir={data_dir}",
      "--workers=2",
    ],
    cwd=REPO_ROOT,
    env=_env_with_sitecustomize(tmp_path / "site", _SLOW_LOG_MEL),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    start_new_session=True,
  )
  try:
    deadline = time.monotonic() + 120
    while not (cache_dir.exists() and len(list(cache_dir.glob("*.npz"))) >= 4):
      assert child.poll() is None, "the preparing process ended early"
      assert time.monotonic() < deadline, "the preparing process cached no clip"
      time.sleep(0.05)
  finally:
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
  cached = len(list(cache_dir.glob("*.npz")))
  good_clips = sum(len(clips) for clips in clotho_raw.expected.values())
  assert 4 <= cached < good_clips  # Killed during the extraction ...
  assert not clotho.Clotho(data_dir=str(data_dir)).is_prepared()  # ... and nothing looks complete.

  decoded = []
  read_audio = features.read_audio
  monkeypatch.setattr(features, "read_audio", lambda path: decoded.append(path) or read_audio(path))
  resumed = clotho.prepare(clotho_raw.root, str(data_dir), workers=1)
  assert len(decoded) == clotho_raw.decodable - cached  # Only what the killed run had not cached.

  assert resumed.info.metadata["preparation"] == clotho_builder.info.metadata["preparation"]
  assert _report_rows(resumed) == _report_rows(clotho_builder)
  for split in clotho_builder.info.splits:
    whole, again = _records(clotho_builder, split), _records(resumed, split)
    assert whole.keys() == again.keys()
    for name in whole:
      for key in whole[name]:
        np.testing.assert_array_equal(whole[name][key], again[name][key])
  files = lambda builder: sorted(p.name for p in builder.data_path.glob("*.tfrecord*"))
  assert files(resumed) == files(clotho_builder)
  for name in files(clotho_builder):  # The very same shards, byte for byte.
    assert (resumed.data_path / name).read_bytes() == (clotho_builder.data_path / name).read_bytes()


_CRASH_ON_A_FILE = """
    import os
    from data_pipelines import features

    _read_audio = features.read_audio

    def read_audio(path):  # A decoder that crashes on one file.
      if path.endswith("crash.wav"):
        os._exit(3)
      return _read_audio(path)

    features.read_audio = read_audio
"""

_RUN_EXTRACTOR = """
import json, os, sys
from data_pipelines import extraction
paths = sys.argv[2:]
with extraction.Extractor(sys.argv[1], workers=2) as extractor:
  outcomes = extractor.run(paths, "crash test")
print(json.dumps([[os.path.basename(p), o.reason, o.detail, o.cache_path is not None]
                  for p, o in zip(paths, outcomes)]))
"""


def test_a_worker_killed_by_one_file_skips_only_that_file(tmp_path):
  names = ["a.wav", "b.wav", "crash.wav", "c.wav", "d.wav", "e.wav"]
  for index, name in enumerate(names):
    _write_audio(str(tmp_path / name), "good", index)
  (tmp_path / "site").mkdir()
  result = subprocess.run(
    [sys.executable, "-c", _RUN_EXTRACTOR, str(tmp_path / "cache")] + [str(tmp_path / n) for n in names],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    env=_env_with_sitecustomize(tmp_path / "site", _CRASH_ON_A_FILE),
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  outcomes = {name: (reason, detail, good) for name, reason, detail, good in json.loads(result.stdout)}
  assert {name: (reason, good) for name, (reason, _, good) in outcomes.items()} == {
    name: ("unreadable_audio", False) if name == "crash.wav" else ("", True) for name in names
  }
  assert "crash.wav killed its worker process (exit status 3" in outcomes["crash.wav"][1]


def test_train_sources_main_first_then_extra(clotho_raw, clotho_builder, audiocaps_raw, audiocaps_cli, monkeypatch):
  monkeypatch.setattr(
    datasets, "default_data_dir", lambda dataset, raw_dir, audio_feature: os.fspath(audiocaps_cli[0].data_dir_root)
  )
  config = get_base_config().data
  config.raw_dir, config.data_dir = clotho_raw.root, os.fspath(clotho_builder.data_dir_root)
  config.audiocaps_file_pattern = AUDIOCAPS_PATTERN
  config.extra_train = f" audiocaps:{audiocaps_raw.root}:train , audiocaps:{audiocaps_raw.root}:test"
  sources = datasets.train_sources(config)
  assert [(b.name, os.fspath(b.data_path), split) for b, split in sources] == [
    ("clotho", os.fspath(clotho_builder.data_path), "development"),
    ("audiocaps", os.fspath(audiocaps_cli[0].data_path), "train"),
    ("audiocaps", os.fspath(audiocaps_cli[0].data_path), "test"),
  ]
  config.extra_train = f"audiocaps:{audiocaps_raw.root}:training"
  with pytest.raises(ValueError, match="extra_train entry .*split 'training' is not in"):
    datasets.train_sources(config)


@pytest.mark.parametrize(
  "entry", ["audiocaps:/data/ac", "esc50:/data/w:train", ":/data:train", "clotho::train", "clotho:/data:"]
)
def test_malformed_extra_train_entry_is_named(entry):
  with pytest.raises(ValueError, match=f"config.data.extra_train entry '{entry}'"):
    datasets.parse_extra_train(f"clotho:/ok:development,{entry}")


def test_parse_extra_train_keeps_colons_inside_the_folder():
  assert datasets.parse_extra_train("audiocaps:/mnt/a:b/ac:train,") == [("audiocaps", "/mnt/a:b/ac", "train")]
  assert datasets.parse_extra_train("") == []


@pytest.mark.parametrize(
  "text, cleaned",
  [
    ('A Dog barks , loudly!  Then "silence" ; done .', "a dog barks loudly then silence done"),
    ("Rain: on a ROOF?yes", "rain on a roof yes"),
    ("it's a bird-like trill", "it's a bird-like trill"),
  ],
)
def test_reference_caption_cleaning(text, cleaned):
  assert captions.clean_caption(text, "reference") == cleaned
  assert captions.clean_caption(text, "raw") == text


def test_unknown_caption_cleaning_names_the_config_key():
  with pytest.raises(ValueError, match="config.data.caption_cleaning='lower'"):
    captions.clean_caption("a", "lower")
