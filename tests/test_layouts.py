"""Raw folder layouts (`layouts`): the same clips, a bad row and an unreadable audio file among them, in the native,
aac-datasets and reference layouts of Clotho and AudioCaps prepare into the same records, counts, report and
clips.json; the layout detected is logged and printed by the prepare CLI; the path checks before a run and the
TensorBoard top-hit audio follow the layout; a folder in no layout or in several is a clear error.

The fixtures spell out each layout's folder and file names (aac-datasets': its aac_datasets/datasets/functional/
clotho.py and audiocaps.py) rather than asking `layouts`, so that the names themselves are checked.
"""

import contextlib
import csv
import io
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from atr_jax import preflight
from atr_jax.evaluation import SplitEmbeddings
from atr_jax.summaries import write_retrieval_examples
from configs.base import get_base_config
from data_pipelines import audiocaps, clip_builder, clotho, extraction, features, layouts, synthetic

SEED = 3
CLOTHO_HEADER = ["file_name"] + [f"caption_{k}" for k in range(1, 6)]
OFFICIAL_HEADER = ["audiocap_id", "youtube_id", "start_time", "caption"]
AAC_FILE_PATTERN = "{youtube_id}_{start_time}.flac"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Layout -> our split -> (caption CSV or None for an audio-only split, audio folder), relative to raw_dir.
CLOTHO_PATHS = {
  "native": {split: (f"clotho_captions_{split}.csv", split) for split in clotho.SPLITS}
  | {"retrieval": (None, "retrieval_audio")},
  "aac-datasets": {
    split: (f"CLOTHO_v2.1/clotho_csv_files/clotho_captions_{split}.csv", f"CLOTHO_v2.1/clotho_audio_files/{split}")
    for split in clotho.SPLITS
  }
  | {"retrieval": (None, "CLOTHO_v2.1/clotho_audio_files/test_retrieval_audio")},
  "reference": {
    ours: (f"csv_files/{theirs}.csv", f"waveforms/{theirs}")
    for ours, theirs in zip(clotho.SPLITS, ("train", "val", "test"))
  },
}
AUDIOCAPS_PATHS = {
  "native": {split: (f"{split}.csv", split) for split in audiocaps.SPLITS},
  "aac-datasets": {
    split: (f"AUDIOCAPS/csv_files_v1/{split}.csv", f"AUDIOCAPS/audio_32000Hz/{split}") for split in audiocaps.SPLITS
  },
  "reference": {split: (f"csv_files/{split}.csv", f"waveforms/{split}") for split in audiocaps.SPLITS},
}


def _write_audio(path: str, index: int) -> None:
  """A 1 s synthetic clip (index >= 0) or garbage bytes (index < 0), in the format of the file's extension."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if index < 0:
    with open(path, "wb") as f:
      f.write(b"not really audio")
  else:
    sf.write(path, synthetic.make_clip(SEED, "development", index, duration_s=1.0)[2], features.SAMPLE_RATE)


def _write_csv(path: str, rows: list[list]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", newline="", encoding="utf-8") as f:
    csv.writer(f).writerows(rows)


def _captions(index: int) -> list[str]:
  return synthetic.make_clip(SEED, "development", index, duration_s=1.0)[1]


def _write_clotho(root: str, layout: str) -> str:
  """The same Clotho clips in `layout` under `root`: development holds 2 good clips, an unreadable file, a row without
  a file name and a clip without a caption; the retrieval split (where the layout has one) a clip and a garbage file."""
  paths = CLOTHO_PATHS[layout]
  rows = {
    "development": [
      ["good_0.wav"] + _captions(0),
      ["garbage.wav"] + _captions(1),
      ["", "a caption without a file", "", "", "", ""],
      ["good_1.wav"] + _captions(2),
      ["nocaption.wav", "", "", "", "", ""],
    ],
    "validation": [["val_0.wav"] + _captions(3)],
    "evaluation": [["eval_0.wav"] + _captions(4)],
  }
  audio = {"good_0.wav": 0, "garbage.wav": -1, "good_1.wav": 2, "nocaption.wav": 5, "val_0.wav": 3, "eval_0.wav": 4}
  for split, split_rows in rows.items():
    csv_path, audio_dir = paths[split]
    _write_csv(os.path.join(root, csv_path), [CLOTHO_HEADER] + split_rows)
    for row in split_rows:
      if row[0]:
        _write_audio(os.path.join(root, audio_dir, row[0]), audio[row[0]])
  if "retrieval" in paths:
    _write_audio(os.path.join(root, paths["retrieval"][1], "query_0.wav"), 6)
    _write_audio(os.path.join(root, paths["retrieval"][1], "query_garbage.wav"), -1)
  return root


def _write_audiocaps_official(root: str, layout: str, file_pattern: str) -> str:
  """The same AudioCaps clips in official CSVs: train has a clip of 2 rows, an unreadable file and a row without a
  youtube_id."""
  rows = {
    "train": [
      (1, "yt_a", 30, "a car passes by"),
      (2, "yt_b", 0, "people talk"),
      (3, "yt_b", 0, "a crowd murmurs"),
      (4, "yt_bad", 10, "static"),
      (5, "", 5, "a caption without a video"),
    ],
    "val": [(10 + k, "yt_v", 0, f"caption {k} of yt_v") for k in range(5)],
    "test": [(20 + k, "yt_t", 20, f"caption {k} of yt_t") for k in range(5)],
  }
  for split, split_rows in rows.items():
    csv_path, audio_dir = AUDIOCAPS_PATHS[layout][split]
    _write_csv(os.path.join(root, csv_path), [OFFICIAL_HEADER] + [list(row) for row in split_rows])
    for audiocap_id, youtube_id, start, _ in split_rows:
      name = file_pattern.format(youtube_id=youtube_id, start_time=start)
      if youtube_id and not os.path.exists(os.path.join(root, audio_dir, name)):
        _write_audio(os.path.join(root, audio_dir, name), -1 if youtube_id == "yt_bad" else audiocap_id)
  return root


def _write_audiocaps_renamed(root: str, layout: str) -> str:
  """The same AudioCaps clips in the reference's renamed CSVs: train `file_name,caption`, one caption a row (a clip
  of 2 rows, an unreadable file, a row without a file name); val and test `file_name,caption_1..caption_5`."""
  rows = {
    "train": [
      ["file_name", "caption"],
      ["a.wav", "a car passes by"],
      ["b.wav", "people talk"],
      ["garbage.wav", "static"],
      ["b.wav", "a crowd murmurs"],
      ["", "a caption without a file"],
    ],
    "val": [CLOTHO_HEADER, ["v.wav"] + _captions(10)],
    "test": [CLOTHO_HEADER, ["t.wav"] + _captions(11)],
  }
  audio = {"a.wav": 1, "b.wav": 2, "garbage.wav": -1, "v.wav": 10, "t.wav": 11}
  for split, split_rows in rows.items():
    csv_path, audio_dir = AUDIOCAPS_PATHS[layout][split]
    _write_csv(os.path.join(root, csv_path), split_rows)
    for name in {row[0] for row in split_rows[1:] if row[0]}:
      _write_audio(os.path.join(root, audio_dir, name), audio[name])
  return root


@contextlib.contextmanager
def _absl_log():
  """The text of what absl logs (INFO and up) inside the block."""
  stream, logger = io.StringIO(), logging.getLogger("absl")
  handler, level = logging.StreamHandler(stream), logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  try:
    yield stream
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)


def _prepare(prepare_fn) -> tuple[clip_builder.CaptionedClips, str]:
  with _absl_log() as log:
    builder = prepare_fn()
  return builder, log.getvalue()


def _prepared(builder, splits=None) -> dict[str, dict]:
  """Per split: the records in clip id order (clip id, file name, captions, log-mel), the counts, the report rows
  (without their detail, which names paths) and the split's clips.json entry."""
  with open(builder.data_path / clip_builder.CLIPS_FILE, encoding="utf-8") as f:
    clips = json.load(f)
  with open(clip_builder.report_path(builder), newline="", encoding="utf-8") as f:
    report = [tuple(row[:5]) for row in list(csv.reader(f))[1:]]
  result = {}
  for split in splits or builder.info.splits:
    records = sorted(
      builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator(), key=lambda r: r["clip_id"]
    )
    result[split] = {
      "records": [
        (int(r["clip_id"]), r["file_name"].decode(), [c.decode() for c in r["captions"]], r["log_mel"].tobytes())
        for r in records
      ],
      "counts": builder.info.metadata["preparation"][split],
      "report": [row for row in report if row[1] == split],
      "clips": clips[split],
    }
  return result


def _names_and_captions(prepared: dict, split: str) -> dict[str, list[str]]:
  return {name: captions for _, name, captions, _ in prepared[split]["records"]}


@pytest.fixture(scope="module")
def clotho_native(tmp_path_factory):
  root = _write_clotho(str(tmp_path_factory.mktemp("clotho_native")), "native")
  return _prepare(lambda: clotho.prepare(root, str(tmp_path_factory.mktemp("clotho_native_out")), workers=1))


@pytest.fixture(scope="module")
def clotho_aac_cli(tmp_path_factory):
  """(raw_dir, builder, stdout + stderr) of the prepare CLI on the aac-datasets root."""
  root = _write_clotho(str(tmp_path_factory.mktemp("aac_root")), "aac-datasets")
  out_dir = str(tmp_path_factory.mktemp("clotho_aac_out"))
  result = subprocess.run(
    [sys.executable, "-m", "data_pipelines.prepare", f"--raw_dir={root}", f"--out_dir={out_dir}", "--workers=1"],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return root, clotho.prepare(root, out_dir, workers=1), result.stdout + result.stderr


def test_clotho_native_fixture_gives_the_good_clips_and_reports_the_broken(clotho_native):
  builder, log = clotho_native
  prepared = _prepared(builder)
  assert set(prepared) == {"development", "validation", "evaluation", "retrieval"}
  assert _names_and_captions(prepared, "development") == {"good_0.wav": _captions(0), "good_1.wav": _captions(2)}
  assert {row[2:] for row in prepared["development"]["report"] if row[3] == extraction.SKIPPED_CLIP} == {
    ("garbage.wav", extraction.SKIPPED_CLIP, "unreadable_audio"),
    ("line 4", extraction.SKIPPED_CLIP, "no_file_name"),
    ("nocaption.wav", extraction.SKIPPED_CLIP, "no_caption"),
  }
  assert list(_names_and_captions(prepared, "retrieval")) == ["query_0.wav"]
  assert "is in the native layout: development = clotho_captions_development.csv + development/" in log


def test_clotho_aac_datasets_root_prepares_like_the_native_folder(clotho_native, clotho_aac_cli):
  native, _ = clotho_native
  root, builder, output = clotho_aac_cli
  assert _prepared(builder) == _prepared(native)
  described = (
    "aac-datasets layout: development = CLOTHO_v2.1/clotho_csv_files/clotho_captions_development.csv + "
    "CLOTHO_v2.1/clotho_audio_files/development/, "
  )
  assert f"clotho: {root} is in the {described}" in output  # Logged (stderr) ...
  assert f"  from {root}, {described}" in output  # ... and in the printed report.
  assert "retrieval = CLOTHO_v2.1/clotho_audio_files/test_retrieval_audio/" in output
  with open(builder.data_path / clip_builder.SOURCES_FILE, encoding="utf-8") as f:
    sources = json.load(f)
  assert sorted(sources["csv"]) == sorted(
    f"CLOTHO_v2.1/clotho_csv_files/clotho_captions_{s}.csv" for s in clotho.SPLITS
  )
  assert "CLOTHO_v2.1/clotho_audio_files/development/good_0.wav" in sources["audio"]
  assert builder.source_changes(root) == ""  # Prepared once: the fingerprint matches its layout's files.


def test_clotho_reference_folder_prepares_like_the_native_folder(clotho_native, tmp_path):
  native, _ = clotho_native
  root = _write_clotho(str(tmp_path / "data" / "Clotho"), "reference")
  builder, log = _prepare(lambda: clotho.prepare(root, str(tmp_path / "out"), workers=1))
  assert set(builder.info.splits) == {"development", "validation", "evaluation"}
  assert _prepared(builder) == _prepared(native, builder.info.splits)
  assert (
    "is in the reference layout: development = csv_files/train.csv + waveforms/train/, validation = "
    "csv_files/val.csv + waveforms/val/, evaluation = csv_files/test.csv + waveforms/test/" in log
  )


@pytest.fixture(scope="module")
def audiocaps_official_native(tmp_path_factory):
  root = _write_audiocaps_official(str(tmp_path_factory.mktemp("ac_native")), "native", AAC_FILE_PATTERN)
  out = str(tmp_path_factory.mktemp("ac_native_out"))
  return _prepare(lambda: audiocaps.prepare(root, out, file_pattern=AAC_FILE_PATTERN, workers=1))


def test_audiocaps_aac_datasets_root_prepares_like_the_native_folder(audiocaps_official_native, tmp_path):
  native, _ = audiocaps_official_native
  prepared = _prepared(native)
  assert _names_and_captions(prepared, "train") == {
    "yt_a_30.flac": ["a car passes by"],
    "yt_b_0.flac": ["people talk", "a crowd murmurs"],
  }
  assert {row[2:] for row in prepared["train"]["report"]} == {
    ("yt_bad_10.flac", extraction.SKIPPED_CLIP, "unreadable_audio"),
    ("line 6", extraction.SKIPPED_CLIP, "no_file_name"),
  }
  root = _write_audiocaps_official(str(tmp_path / "aac"), "aac-datasets", AAC_FILE_PATTERN)
  # The default file pattern stands for the layout's naming: aac-datasets' {youtube_id}_{start_time}.flac.
  builder, log = _prepare(lambda: audiocaps.prepare(root, str(tmp_path / "out"), workers=1))
  assert builder.builder_config.file_pattern == AAC_FILE_PATTERN
  assert _prepared(builder) == prepared
  assert (
    f"audiocaps: {root} is in the aac-datasets layout: train = AUDIOCAPS/csv_files_v1/train.csv + "
    "AUDIOCAPS/audio_32000Hz/train/" in log
  )


def test_audiocaps_reference_folder_prepares_like_the_native_folder(tmp_path):
  native_root = _write_audiocaps_renamed(str(tmp_path / "native"), "native")
  native, _ = _prepare(lambda: audiocaps.prepare(native_root, str(tmp_path / "native_out"), workers=1))
  prepared = _prepared(native)
  # One caption a row: the two rows of b.wav are one clip.
  assert _names_and_captions(prepared, "train") == {
    "a.wav": ["a car passes by"],
    "b.wav": ["people talk", "a crowd murmurs"],
  }
  assert prepared["train"]["counts"]["clips_read"] == 4 and prepared["train"]["counts"]["captions_read"] == 5
  assert {row[2:] for row in prepared["train"]["report"]} == {
    ("garbage.wav", extraction.SKIPPED_CLIP, "unreadable_audio"),
    ("line 6", extraction.SKIPPED_CLIP, "no_file_name"),
  }
  root = _write_audiocaps_renamed(str(tmp_path / "data" / "AudioCaps"), "reference")
  builder, log = _prepare(lambda: audiocaps.prepare(root, str(tmp_path / "out"), workers=1))
  assert _prepared(builder) == prepared
  assert "is in the reference layout: train = csv_files/train.csv + waveforms/train/, val = " in log


@pytest.mark.parametrize("dataset", ["clotho", "audiocaps"])
def test_a_folder_in_no_layout_names_what_was_looked_for(tmp_path, dataset):
  (tmp_path / "notes.txt").write_text("not a dataset")
  with pytest.raises(FileNotFoundError, match=f"{tmp_path} is in no {dataset} layout: looked for native") as error:
    layouts.detect(dataset, str(tmp_path))
  for paths in (CLOTHO_PATHS if dataset == "clotho" else AUDIOCAPS_PATHS).values():
    for csv_path, audio_dir in paths.values():
      assert (csv_path or audio_dir) in str(error.value)
  with pytest.raises(FileNotFoundError, match="is in no"):
    (clotho if dataset == "clotho" else audiocaps).prepare(str(tmp_path), str(tmp_path / "out"))


def test_a_folder_in_several_layouts_is_an_error(tmp_path):
  _write_csv(str(tmp_path / "clotho_captions_development.csv"), [CLOTHO_HEADER])
  _write_csv(str(tmp_path / "csv_files" / "val.csv"), [CLOTHO_HEADER])
  with pytest.raises(ValueError, match=r"several clotho layouts: native \(development\); reference \(validation\)"):
    layouts.detect("clotho", str(tmp_path))


def test_aac_audiocaps_csv_and_audio_folder_as_aac_datasets_finds_them(tmp_path):
  root = tmp_path / "AUDIOCAPS"
  _write_csv(str(root / "csv_files_v1" / "train.csv"), [OFFICIAL_HEADER])
  _write_csv(str(root / "val.csv"), [OFFICIAL_HEADER])  # aac-datasets reads AUDIOCAPS/<split>.csv first.
  (root / "audio_44100Hz").mkdir()
  layout = layouts.detect("audiocaps", str(tmp_path))
  assert (layout.name, list(layout.present_splits())) == ("aac-datasets", ["train", "val"])
  assert layout.splits["val"].csv_path == str(root / "val.csv")
  assert layout.splits["train"].audio_dir == str(root / "audio_44100Hz" / "train")  # The only rate there is.
  assert audiocaps.captions_csv_path(str(tmp_path), "train") == str(root / "csv_files_v1" / "train.csv")
  (root / "audio_16000Hz").mkdir()
  with pytest.raises(ValueError, match=r"several aac-datasets audio folders \['audio_16000Hz', 'audio_44100Hz'\]"):
    layouts.detect("audiocaps", str(tmp_path))
  (root / "audio_32000Hz").mkdir()
  assert layouts.detect("audiocaps", str(tmp_path)).splits["test"].audio_dir == str(root / "audio_32000Hz" / "test")


def test_file_pattern_follows_the_layout_unless_given(tmp_path):
  _write_csv(str(tmp_path / "AUDIOCAPS" / "csv_files_v1" / "train.csv"), [OFFICIAL_HEADER])
  assert audiocaps.file_pattern_for(str(tmp_path), audiocaps.DEFAULT_FILE_PATTERN) == AAC_FILE_PATTERN
  assert audiocaps.file_pattern_for(str(tmp_path), "{youtube_id}_{start_time}.wav") == "{youtube_id}_{start_time}.wav"
  assert audiocaps.file_pattern_for(str(tmp_path / "none"), audiocaps.DEFAULT_FILE_PATTERN) == "{youtube_id}.wav"


def test_preflight_checks_the_paths_of_the_layout(tmp_path):
  config = get_base_config().data
  config.raw_dir = _write_clotho(str(tmp_path / "data" / "Clotho"), "reference")
  preflight.check_data_paths(config, training=True)
  os.remove(tmp_path / "data" / "Clotho" / "csv_files" / "val.csv")
  with pytest.raises(
    FileNotFoundError,
    match=r"config\.data\.val_split='validation': .*csv_files/val\.csv does not exist \(the reference",
  ):
    preflight.check_data_paths(config, training=True)
  config.test_split = "retrieval"
  with pytest.raises(ValueError, match=r"test_split='retrieval' is not a split of the reference clotho layout"):
    preflight.check_data_paths(config, training=False)
  config.raw_dir = str(tmp_path / "empty")
  os.makedirs(config.raw_dir)
  config.test_split = "evaluation"
  with pytest.raises(FileNotFoundError, match=r"clotho_captions_evaluation\.csv does not exist \(.*is in no clotho"):
    preflight.check_data_paths(config, training=False)


class _RecordingWriter:
  """A clu metric writer keeping what it is given."""

  def __init__(self):
    self.texts, self.audios = {}, {}

  def write_texts(self, step, texts):
    self.texts.update(texts)

  def write_audios(self, step, audios, *, sample_rate):
    assert sample_rate == features.SAMPLE_RATE
    self.audios.update(audios)


@pytest.mark.parametrize(
  "dataset,layout,split,file_names",
  [
    ("clotho", "aac-datasets", "development", ["good_0.wav", "good_1.wav"]),
    ("clotho", "reference", "development", ["good_0.wav", "good_1.wav"]),
    ("audiocaps", "aac-datasets", "train", ["yt_a_30.flac", "yt_b_0.flac"]),
  ],
)
def test_top_hit_audio_summary_reads_the_split_where_the_layout_keeps_it(
  tmp_path, caplog, dataset, layout, split, file_names
):
  """The TensorBoard top hits of a raw folder in a non-native layout are the clips' real audio (each query's top hit
  is its own clip), read without a warning."""
  root = str(tmp_path / "raw")
  if dataset == "clotho":
    _write_clotho(root, layout)
    audio_dir = CLOTHO_PATHS[layout][split][1]
  else:
    _write_audiocaps_official(root, layout, AAC_FILE_PATTERN)
    audio_dir = AUDIOCAPS_PATHS[layout][split][1]
  embeddings = np.eye(2, 4)
  emb = SplitEmbeddings(embeddings, embeddings, np.arange(2), ["first", "second"], file_names)
  writer = _RecordingWriter()
  with caplog.at_level("WARNING"):
    write_retrieval_examples(
      writer, 1, emb, dataset=dataset, raw_dir=root, split=split, num_queries=2, top_k=2, audio_seconds=1.0
    )
  assert not caplog.records, caplog.text
  top_hits = writer.audios[f"{split}/top_hits"][:, :, 0]
  for row, name in enumerate(file_names):
    waveform = features.load_audio(os.path.join(root, audio_dir, name))
    assert np.abs(waveform).max() > 0.01  # real audio, not silence
    np.testing.assert_allclose(top_hits[row, : waveform.size], np.clip(waveform, -1.0, 1.0)[: top_hits.shape[1]])
