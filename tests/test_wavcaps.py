"""WavCaps (`wavcaps`): its four JSON sources (a broken entry of every kind and excluded Freesound ids among them)
prepare into the expected records, counts and report; the native and aac-datasets layouts are detected and read
alike; the exclusion list is part of the builder's identity and of its sources' fingerprint; `extra_train` and the
run's path checks accept a WavCaps source.

The fixture spells out the JSON file names, the entry keys and the audio naming (as aac-datasets'
aac_datasets/datasets/functional/wavcaps.py reads them) rather than asking `layouts`, so that the names are checked.
"""

import collections
import csv
import json
import os

import numpy as np
import pytest
import soundfile as sf

from atr_jax import preflight
from configs.base import get_base_config
from data_pipelines import clip_builder, datasets, extraction, features, layouts, wavcaps

SKIPPED, SKIPPED_CAPTION = extraction.SKIPPED_CLIP, extraction.SKIPPED_CAPTION

# Source -> (its JSON under json_files/<source>/, its entries: (id, caption, audio: seconds, "garbage" or None)).
SOURCES = {
  "AudioSet_SL": (
    "as_final.json",
    [("Yaaa.wav", "A dog barks twice.", 0.5), ("Ybbb.wav", "Rain falls on a roof.", None)],
  ),
  "BBC_Sound_Effects": ("bbc_final.json", [("07001", "Birds sing at dawn.", 1.0), ("07002", "", 0.5)]),
  "FreeSound": (
    "fsd_final.json",
    [
      ("101", "Someone types on a keyboard.", 0.5),
      ("102", "A Clotho evaluation clip.", 0.5),  # Excluded.
      ("103", "Another excluded clip, its audio missing.", None),  # Excluded.
      ("104", "A file that is not audio.", "garbage"),
      ("", "An entry without an id.", None),
    ],
  ),
  "SoundBible": ("sb_final.json", [("1234", "A long thunder roll.", 2.5)]),  # Longer than any training crop here.
}
EXCLUDED_IDS = ["102", "103", "Not found"]  # aac-datasets' lists hold "Not found" rows too.
EXPECTED = {  # Record file name -> captions.
  "AudioSet_SL/Yaaa.flac": ["A dog barks twice."],
  "BBC_Sound_Effects/07001.flac": ["Birds sing at dawn."],
  "FreeSound/101.flac": ["Someone types on a keyboard."],
  "SoundBible/1234.flac": ["A long thunder roll."],
}
REPORT = collections.Counter(
  {
    ("AudioSet_SL/Ybbb.flac", SKIPPED, "missing_audio"): 1,
    ("bbc_final.json entry 2", SKIPPED_CAPTION, "empty_caption"): 1,
    ("BBC_Sound_Effects/07002.flac", SKIPPED, "no_caption"): 1,
    ("FreeSound/102.flac", SKIPPED, "excluded_id"): 1,
    ("FreeSound/103.flac", SKIPPED, "excluded_id"): 1,
    ("FreeSound/104.flac", SKIPPED, "unreadable_audio"): 1,
    ("fsd_final.json entry 5", SKIPPED, "no_file_name"): 1,
  }
)


def _write_wavcaps(root: str) -> None:
  """The fixture's JSONs in `root/json_files/<source>/` and its flac files in `root/Audio/<source>/`."""
  for index, (source, (json_name, entries)) in enumerate(SOURCES.items()):
    os.makedirs(os.path.join(root, "json_files", source))
    os.makedirs(os.path.join(root, "Audio", source))
    data = [{"id": i, "caption": c, "duration": 1.0, "audio": "wav_path"} for i, c, _ in entries]
    with open(os.path.join(root, "json_files", source, json_name), "w", encoding="utf-8") as f:
      json.dump({"num_captions_per_audio": 1, "data": data}, f)
    for number, (clip_id, _, audio) in enumerate(entries):
      path = os.path.join(root, "Audio", source, clip_id.replace(".wav", "") + ".flac")
      if audio == "garbage":
        with open(path, "wb") as f:
          f.write(b"not really audio")
      elif audio is not None:
        rng = np.random.default_rng(10 * index + number)
        sf.write(path, 0.3 * rng.standard_normal(int(audio * features.SAMPLE_RATE)), features.SAMPLE_RATE)


def _write_exclusions(path: str, ids: list[str]) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    csv.writer(f).writerows([["index", "id"]] + [[i, clip_id] for i, clip_id in enumerate(ids)])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """(raw_dir, exclusion CSV, builder) of the fixture in the native layout, prepared with the exclusion list."""
  raw_dir = str(tmp_path_factory.mktemp("wavcaps") / "WavCaps")
  _write_wavcaps(raw_dir)
  exclude_csv = str(tmp_path_factory.mktemp("ids") / "blacklist_clotho.full.csv")
  _write_exclusions(exclude_csv, EXCLUDED_IDS)
  data_dir = str(tmp_path_factory.mktemp("prepared"))
  return (
    raw_dir,
    exclude_csv,
    datasets.prepare("wavcaps", raw_dir, data_dir, wavcaps_exclude_csv=exclude_csv, workers=1),
  )


def test_records_are_the_good_clips_whole_with_their_caption(prepared):
  raw_dir, _, builder = prepared
  assert list(builder.info.splits) == ["train"]
  records = {
    r["file_name"].decode(): r for r in builder.as_dataset(split="train", shuffle_files=False).as_numpy_iterator()
  }
  assert sorted(records) == sorted(EXPECTED)
  for clip_id, name in enumerate(sorted(EXPECTED)):
    record = records[name]
    assert record["clip_id"] == clip_id
    assert [c.decode() for c in record["captions"]] == EXPECTED[name]
    reference = features.log_mel(features.load_audio(os.path.join(raw_dir, "Audio", name)))
    assert record["log_mel"].shape == reference.shape  # Stored whole: 2.5 s are 251 frames.
    np.testing.assert_allclose(record["log_mel"].astype(np.float32), reference, rtol=2.0**-11 * 1.01, atol=1e-6)
  with open(builder.data_path / clip_builder.CLIPS_FILE, encoding="utf-8") as f:
    assert json.load(f)["train"]["file_names"] == sorted(EXPECTED)


def test_every_broken_entry_and_excluded_id_is_reported(prepared):
  _, _, builder = prepared
  with open(clip_builder.report_path(builder), newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f))[1:]
  assert {(row[0], row[1]) for row in rows} == {("wavcaps", "train")}
  assert collections.Counter((row[2], row[3], row[4]) for row in rows) == REPORT
  counts = builder.info.metadata["preparation"]["train"]
  assert (counts["clips_read"], counts["clips_written"], counts["captions_read"], counts["captions_written"]) == (
    10,
    4,
    10,
    4,
  )
  assert counts["skipped_clips"] == {
    "missing_audio": 1,
    "no_caption": 1,
    "excluded_id": 2,
    "unreadable_audio": 1,
    "no_file_name": 1,
  }
  assert counts["skipped_captions"] == {
    "missing_audio": 1,
    "empty_caption": 1,
    "excluded_id": 2,
    "unreadable_audio": 1,
    "no_file_name": 1,
  }
  assert counts["notes"] == {}


def test_exclusion_list_names_the_builder_and_is_fingerprinted(prepared):
  raw_dir, exclude_csv, builder = prepared
  assert builder.builder_config.name.startswith("exclude-blacklist_clotho.full-")
  assert wavcaps.WavCaps.config_for("").name == "all"
  assert builder.source_changes(raw_dir) == ""
  edited = os.path.join(os.path.dirname(exclude_csv), "edited.csv")
  _write_exclusions(edited, ["102"])
  changed = wavcaps.WavCaps(data_dir=builder.data_dir_root, config=wavcaps.WavCaps.config_for(edited))
  assert changed.builder_config.name != builder.builder_config.name and not changed.is_prepared()
  os.utime(exclude_csv)  # Touched, content unchanged: the same sources.
  assert builder.source_changes(raw_dir) == ""
  with open(exclude_csv, "a", encoding="utf-8") as f:
    f.write("9,101\n")
  try:
    assert "blacklist_clotho.full.csv edited" in builder.source_changes(raw_dir)
  finally:
    _write_exclusions(exclude_csv, EXCLUDED_IDS)
  with pytest.raises(FileNotFoundError, match=r"config.data.wavcaps_exclude_csv .*nowhere.csv"):
    wavcaps.prepare(raw_dir, str(builder.data_dir_root), exclude_csv=os.path.join(raw_dir, "nowhere.csv"))


def test_native_and_aac_datasets_layouts_read_alike(prepared, tmp_path):
  raw_dir, exclude_csv, builder = prepared
  aac_root = tmp_path / "aac"
  os.makedirs(aac_root)
  os.symlink(raw_dir, aac_root / "WavCaps")
  native, aac = layouts.detect("wavcaps", raw_dir), layouts.detect("wavcaps", str(aac_root))
  assert (native.name, aac.name) == ("native", "aac-datasets")
  assert aac.splits["train"].sources["FreeSound"].csv_path == str(
    aac_root / "WavCaps/json_files/FreeSound/fsd_final.json"
  )
  assert aac.splits["train"].sources["SoundBible"].audio_dir == str(aac_root / "WavCaps/Audio/SoundBible")
  assert "train (AudioSet_SL) = WavCaps/json_files/AudioSet_SL/as_final.json + WavCaps/Audio/AudioSet_SL/" in (
    aac.describe()
  )

  def clips(root):
    tables, _ = builder.read_sources(root, extraction.Report("wavcaps"))
    return [(c.file_name, os.path.relpath(c.audio_path, root), c.captions) for c in tables["train"]]

  assert [(n, p.removeprefix("WavCaps/"), c) for n, p, c in clips(str(aac_root))] == clips(raw_dir)


def test_a_folder_in_no_layout_or_with_a_bad_json_is_a_clear_error(tmp_path):
  builder = wavcaps.WavCaps(data_dir=str(tmp_path / "out"))
  with pytest.raises(FileNotFoundError, match=r"no wavcaps layout: .*json_files/FreeSound/fsd_final.json"):
    builder.read_sources(str(tmp_path), extraction.Report("wavcaps"))
  os.makedirs(tmp_path / "json_files" / "SoundBible")
  (tmp_path / "json_files" / "SoundBible" / "sb_final.json").write_text('{"data": {"id": "1"}}')
  with pytest.raises(ValueError, match=r"sb_final.json: expected"):
    builder.read_sources(str(tmp_path), extraction.Report("wavcaps"))


def test_extra_train_and_the_path_checks_accept_wavcaps(prepared, tmp_path, monkeypatch):
  raw_dir, exclude_csv, builder = prepared
  assert datasets.parse_extra_train(f"wavcaps:{raw_dir}:train") == [("wavcaps", raw_dir, "train")]
  clotho_dir = tmp_path / "clotho"
  os.makedirs(clotho_dir)
  for split in ("development", "validation", "evaluation"):
    (clotho_dir / f"clotho_captions_{split}.csv").write_text("file_name,caption_1\n")
  config = get_base_config()
  config.data.raw_dir = str(clotho_dir)
  config.data.wavcaps_exclude_csv = exclude_csv
  config.data.extra_train = f"wavcaps:{raw_dir}:train"
  preflight.check_data_paths(config.data, training=True)
  config.data.extra_train = f"wavcaps:{raw_dir}:val"
  with pytest.raises(ValueError, match=r"extra_train entry wavcaps:.*'val' is not a split of the native wavcaps"):
    preflight.check_data_paths(config.data, training=True)
  config.data.extra_train = f"wavcaps:{raw_dir}:train"
  config.data.train_split = "train"  # The main dataset stands in for a prepared one here: WavCaps itself.
  monkeypatch.setattr(datasets, "prepare_builder", lambda data_config: builder)
  monkeypatch.setattr(
    datasets, "default_data_dir", lambda dataset, raw, audio_feature: os.fspath(builder.data_dir_root)
  )
  sources = datasets.train_sources(config.data)
  assert [(b.name, os.fspath(b.data_path), split) for b, split in sources] == [
    ("wavcaps", os.fspath(builder.data_path), "train")
  ] * 2
