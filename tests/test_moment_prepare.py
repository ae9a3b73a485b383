"""A moment split prepared into TFRecords (`data_pipelines.moment_builder`, the `prepare` command): every good
recording once, its waveform the int16 form of the wav as soundfile reads it, its queries and windows as the reader
gives them, in the file's order; a missing and a corrupt recording skipped and reported with their queries, and the
reader's clipped and dropped windows reported; prepared again when the annotations or a recording change (decoding
only the changed recording), not when nothing did; a preparation killed while writing leaves no dataset and the next
one completes without decoding again; and the features computed through the prepared split match the files'."""

import csv
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
from test_moment_features import moment_split  # noqa: F401  (a fixture)

from atr_jax.moments import __main__ as command
from atr_jax.moments import features as moment_features
from configs.base import get_base_config
from data_pipelines import audio_forms, clip_builder, features, moment_builder, moments
from data_pipelines.moment_annotations import read_annotations

FORM = audio_forms.WAVEFORM


def _lines(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _write_lines(path: str, lines: list[dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(line) + "\n" for line in lines)


@pytest.fixture
def split(moment_split, tmp_path):  # noqa: F811
  """(annotations, audio_dir, good vids) of a copy of the val split whose annotations add a query of a missing
  recording, one of a corrupt recording, a window past the duration, a query whose only window is empty and one that
  gives its recording another duration (6 s)."""
  data = str(tmp_path / "set")
  shutil.copytree(moment_split, data)
  audio_dir = os.path.join(data, "val")
  lines = _lines(os.path.join(data, "val.jsonl"))
  good = sorted({line["vid"] for line in lines})
  lines[0]["relevant_windows"].append([3, 4800])
  with open(os.path.join(audio_dir, "corrupt.wav"), "wb") as f:
    f.write(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(40)))
  lines += [
    {"qid": "m1", "query": "a missing recording", "duration": 5, "vid": "gone", "relevant_windows": [[1, 2]]},
    {"qid": "c1", "query": "a corrupt recording", "duration": 5, "vid": "corrupt", "relevant_windows": [[0, 1]]},
    {"qid": "e1", "query": "an empty window", "duration": 5, "vid": good[0], "relevant_windows": [[4, 2]]},
  ]
  d1 = {"qid": "d1", "query": "a longer duration", "duration": 6, "vid": good[1], "relevant_windows": [[0.5, 5.5]]}
  lines.insert(0, d1)  # The file's order is not the recordings' order.
  annotations = os.path.join(data, "crafted.jsonl")
  _write_lines(annotations, lines)
  return annotations, audio_dir, good


def _records(builder) -> dict[str, dict]:
  found = {}
  for record in moment_builder.records(builder):
    vid = record["vid"].decode("utf-8")
    assert vid not in found
    found[vid] = record
  return found


def _report(builder) -> list[dict]:
  with open(clip_builder.report_path(builder), newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
  """The files decoded from now on (preparations run with workers=1, in this process)."""
  paths, real = [], features.read_audio

  def counting(path):
    paths.append(os.path.basename(path))
    return real(path)

  monkeypatch.setattr(features, "read_audio", counting)
  return paths


def test_records_queries_and_report(split, capsys):
  annotations, audio_dir, good = split
  moments.main(["prepare", "--annotations", annotations, "--audio_dir", audio_dir, "--workers", "1"])
  out = capsys.readouterr().out
  builder = moment_builder.prepare_split(annotations, audio_dir)
  assert os.fspath(builder.data_path).startswith(os.path.join(os.path.dirname(annotations), "prepared") + os.sep)
  assert f"prepared in {builder.data_path}: 2 recordings, 4 queries" in out
  assert clip_builder.report_path(builder) in out

  records = _records(builder)
  assert sorted(records) == good
  durations = {good[0]: 5.0, good[1]: 6.0}  # A recording's longest.
  numbered = [  # Positions among the file's usable queries, those of the skipped recordings included.
    (i, dataclasses.replace(q, fg_db=None, duration=durations[q.vid]))
    for i, q in enumerate(read_annotations(annotations)[0])
    if q.vid in good
  ]
  expected = [q for _, q in numbered]
  assert moment_builder.split_queries(builder) == expected  # The file's order; windows exactly (float64).
  assert expected[0].qid == "d1" and expected[1].windows[-1] == (3.0, 5.0)  # Clipped by the reader.
  for vid, record in records.items():
    decoded, rate = sf.read(os.path.join(audio_dir, vid + ".wav"), dtype="float32")
    samples, _ = sf.read(os.path.join(audio_dir, vid + ".wav"), dtype="int16")
    assert rate == features.SAMPLE_RATE and record["waveform"].dtype == np.int16
    np.testing.assert_array_equal(record["waveform"], FORM.compute(decoded))  # Bit for bit the waveform form.
    assert np.abs(record["waveform"].astype(np.int32) - samples).max() <= 1  # Full scale 32767, not 32768.
    assert record["duration"] == durations[vid]
    assert moment_builder.record_queries(record) == [(i, q) for i, q in numbered if q.vid == vid]

  rows = {(row["item"], row["outcome"], row["reason"]) for row in _report(builder)}
  assert ("gone", "skipped clip", "missing_audio") in rows
  assert ("corrupt", "skipped clip", "unreadable_audio") in rows
  assert ("e1", "skipped caption", "no_window") in rows and ("e1", "note", "window_dropped") in rows
  assert (expected[1].qid, "note", "window_clipped") in rows and (good[1], "note", "duration_mismatch") in rows
  counts = builder.info.metadata["preparation"][moment_builder.SPLIT]
  assert (counts["clips_read"], counts["clips_written"]) == (4, 2)
  assert (counts["captions_read"], counts["captions_written"]) == (7, 4)
  assert counts["skipped_captions"] == {"missing_audio": 1, "unreadable_audio": 1, "no_window": 1}
  skipped = sorted(moment_builder.skipped_recordings(builder))
  assert [vid for vid, _ in skipped] == ["corrupt", "gone"]
  assert skipped[0][1].startswith("unreadable_audio: ") and skipped[1][1].startswith("missing_audio: ")

  other = os.path.join(os.path.dirname(annotations), "val.jsonl")
  with pytest.raises(FileNotFoundError, match="audio_dir"):
    moment_builder.prepare_split(other, audio_dir + "-none")
  os.makedirs(audio_dir + "-empty")
  with pytest.raises(clip_builder.NoUsableClip, match="is empty"):
    moment_builder.prepare_split(other, audio_dir + "-empty")
  os.makedirs(audio_dir + "-unrelated")
  shutil.copy(os.path.join(audio_dir, "corrupt.wav"), audio_dir + "-unrelated")
  with pytest.raises(command.UsageError, match="no query has a readable recording"):  # One line, not the summary.
    command.split_features("unused", get_base_config().moments, other, audio_dir + "-unrelated")


def test_prepared_again_only_when_sources_change(split, decodes, monkeypatch):
  annotations, audio_dir, good = split
  first = moment_builder.prepare_split(annotations, audio_dir, workers=1)
  assert sorted(decodes) == sorted([f"{vid}.wav" for vid in good] + ["corrupt.wav"])

  with monkeypatch.context() as patch:
    patch.setattr(moment_builder.MomentRecordings, "_split_generators", lambda *_: pytest.fail("prepared again"))
    moment_builder.prepare_split(annotations, audio_dir, workers=1)

  lines = _lines(annotations)
  lines[2]["query"] = "an edited query"
  _write_lines(annotations, lines)
  decodes.clear()
  edited = moment_builder.prepare_split(annotations, audio_dir, workers=1)
  assert edited.data_path == first.data_path
  assert [q.query for q in moment_builder.split_queries(edited)][2] == "an edited query"
  assert decodes == ["corrupt.wav"]  # The good recordings come from the feature cache (a bad one is never cached).

  path = os.path.join(audio_dir, good[1] + ".wav")
  audio, rate = sf.read(path, dtype="float32")
  sf.write(path, audio[::-1].copy(), rate, subtype="PCM_16")
  decodes.clear()
  modified = moment_builder.prepare_split(annotations, audio_dir, workers=1)
  assert sorted(decodes) == sorted([f"{good[1]}.wav", "corrupt.wav"])
  reread, _ = sf.read(path, dtype="float32")
  np.testing.assert_array_equal(_records(modified)[good[1]]["waveform"], FORM.compute(reread))
  assert not np.array_equal(FORM.compute(reread), FORM.compute(audio))


def test_killed_preparation_leaves_nothing_and_resumes(split, decodes, monkeypatch):
  annotations, audio_dir, good = split
  real, written = moment_builder.MomentRecordings._record, []

  def killed_after_one(self, clip_id, clip):
    if written:
      raise RuntimeError("killed while writing")
    written.append(clip.file_name)
    return real(self, clip_id, clip)

  with monkeypatch.context() as patch:
    patch.setattr(moment_builder.MomentRecordings, "_record", killed_after_one)
    with pytest.raises(RuntimeError, match="killed while writing"):
      moment_builder.prepare_split(annotations, audio_dir, workers=1)
  assert written
  builder = moment_builder.MomentRecordings(
    data_dir=moment_builder.default_data_dir(annotations), config=moment_builder.config_for(annotations)
  )
  assert not builder.is_prepared() and not os.path.exists(builder.data_path)
  decodes.clear()
  resumed = moment_builder.prepare_split(annotations, audio_dir, workers=1)
  assert sorted(_records(resumed)) == good
  assert decodes == ["corrupt.wav"]  # What the killed run decoded came from the feature cache.


@pytest.mark.slow
def test_features_through_the_prepared_split_match_the_files(tiny_trained, moment_split, tmp_path):  # noqa: F811
  _, workdir = tiny_trained
  data = str(tmp_path / "set")
  shutil.copytree(moment_split, data)
  annotations, audio_dir = os.path.join(data, "val.jsonl"), os.path.join(data, "val")
  split = moment_features.split_features(workdir, annotations, audio_dir)
  prepared = moment_builder.prepare_split(annotations, audio_dir)
  cache = moment_features.default_cache_dir(annotations, workdir, "clap_like")
  with open(os.path.join(cache, moment_features.FINGERPRINT_FILE)) as f:
    assert json.load(f)["prepared"] == moment_builder.fingerprint(prepared)
  assert [q.qid for q in split.queries] == [q.qid for q in read_annotations(annotations)[0]]
  featurizer = moment_features.Featurizer(workdir, moment_features.SETTINGS["clap_like"])
  for vid, frames in split.frames.items():
    decoded = features.load_audio(os.path.join(audio_dir, vid + ".wav"))
    # The same computation on the waveform form of the file, bit for bit; on the file's own samples, to within what
    # one int16 step at full scale 32767 (rather than 32768) changes.
    np.testing.assert_array_equal(frames, featurizer.frames(FORM.to_float32(FORM.compute(decoded))))
    np.testing.assert_allclose(frames, featurizer.frames(decoded), atol=1e-4)
