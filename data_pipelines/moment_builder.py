"""TFDS builder of a moment-retrieval split (an annotation file and the folder of its recordings `<vid>.<ext>`),
`prepare_split`, and the readers of what it wrote.

The clip builder's machinery (`clip_builder`: the fingerprint of the sources, the report, the feature cache that makes
a killed preparation resumable, the `incomplete.*` folder renamed only once complete, the preparation again when a
source changed) with one record per recording, in split `recordings`: `vid`, its 32 kHz mono samples in the
`waveform` audio form (`audio_forms`: int16 at full scale 32767), `duration` (the annotated seconds), and its queries
in the annotation file's order: `qids`, `queries` (the texts), `query_index` (each query's position among the file's
usable queries, so that `split_queries` gives them back in the file's order), `windows` (float64 (W, 2) seconds,
the windows of every query one after another) and `window_counts` (each query's windows). The split's table
(`clips.json`) holds the same fields but the waveform (column `records`): `split_queries` reads no audio.

The sources are the annotation file (lighthouse JSONL or CASTELLA JSON, `moment_annotations.read_annotations`; its
SHA-1 is in the fingerprint, keyed by its absolute path when it lies outside the recordings' folder) and each
recording's size and modification time. The report (`preparation_report.csv`; a query counts as a caption) lists
every window the reader clipped (note `window_clipped`) or dropped (`window_dropped`), every query left without a
window (skipped caption `no_window`), recordings whose queries disagree on the duration (note `duration_mismatch`:
the longest is kept), and every recording skipped with its queries: no `<vid>.<ext>` in the folder (`missing_audio`),
or a file that cannot be decoded (`extraction`'s reasons).

Where: by default `<annotations folder>/prepared/`, the builder config named after the annotations' stem (each
annotation file of a folder has its own), the feature cache beside the version folder.
"""

import csv
import dataclasses
import glob
import hashlib
import json
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_pipelines import audio_forms, clip_builder, extraction, features
from data_pipelines.moment_annotations import MomentQuery, read_annotations

NAME = "moment_recordings"
SPLIT = "recordings"
PREPARED_FOLDER = "prepared"


@dataclasses.dataclass(eq=False)
class MomentSplitConfig(tfds.core.BuilderConfig):
  """The annotation file of the split (an absolute path)."""

  annotations: str = ""


def config_for(annotations: str) -> MomentSplitConfig:
  path = os.path.abspath(os.path.expanduser(annotations))
  stem = re.sub(r"[^A-Za-z0-9_.]+", "_", os.path.splitext(os.path.basename(path))[0]).strip("_") or "annotations"
  return MomentSplitConfig(name=stem, annotations=path, description=f"the queries of {path} and their recordings")


def default_data_dir(annotations: str) -> str:
  """`<annotations folder>/prepared`."""
  return os.path.join(os.path.dirname(os.path.abspath(os.path.expanduser(annotations))), PREPARED_FOLDER)


def find_audio(audio_dir: str, vid: str) -> str | None:
  """`audio_dir/<vid>.<audio extension>` (the first by name when there are several), None when there is none."""
  for path in sorted(glob.glob(os.path.join(glob.escape(audio_dir), glob.escape(vid) + ".*"))):
    if os.path.splitext(path)[1].lower() in features.audio_extensions():
      return path
  return None


@dataclasses.dataclass(frozen=True)
class RecordingRow(clip_builder.ClipRow):
  """A recording: `file_name` is its vid, `captions` its queries' texts, `queries` (position in the file, query)."""

  queries: tuple[tuple[int, MomentQuery], ...]


class MomentRecordings(clip_builder.CaptionedClips, skip_registration=True):
  """A moment-retrieval split: one record per recording (its waveform, duration and queries)."""

  name = NAME
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Int16 32 kHz waveforms of the recordings with their queries and windows."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Pass the folder of the recordings <vid>.<ext> of the annotation file the builder config names as the manual_dir."
  )

  def captions_csvs(self, raw_dir: str) -> dict[str, str]:
    """The annotation file (its SHA-1 is part of the sources' fingerprint)."""
    return {SPLIT: self.builder_config.annotations}

  def _read_splits(self, raw_dir: str, report: extraction.Report) -> dict[str, list[clip_builder.ClipRow]]:
    queries, problems = read_annotations(self.builder_config.annotations)
    for problem in problems:
      if problem.window is None:  # A query dropped by the reader: read, never written.
        report.split_counts(SPLIT)["captions_read"] += 1
        report.skip_caption(SPLIT, problem.qid, "no_window", str(problem))
      else:
        kind = "window_dropped" if problem.action == "dropped" else "window_clipped"
        report.note(SPLIT, problem.qid, kind, str(problem))
    by_vid = {}
    for index, query in enumerate(queries):
      by_vid.setdefault(query.vid, []).append((index, query))
    rows = []
    for vid, numbered in by_vid.items():
      texts = tuple(query.query for _, query in numbered)
      report.read(SPLIT, len(texts))
      durations = sorted({query.duration for _, query in numbered})
      if len(durations) > 1:
        report.note(SPLIT, vid, "duration_mismatch", f"its queries give durations {durations}: the longest is kept")
      path = find_audio(raw_dir, vid)
      if path is None:
        report.skip_clip(SPLIT, vid, "missing_audio", f"no audio file {vid}.<ext> in {raw_dir}", len(texts))
        continue
      rows.append(RecordingRow(vid, path, texts, 0, tuple(numbered)))
    return {SPLIT: clip_builder.unique_clips(rows, SPLIT, report, need_captions=True)}

  def _record_features(self) -> dict:
    strings = tfds.features.Tensor(shape=(None,), dtype=np.str_)
    # Raw bytes: a float feature's default encoding is a float32 list (a window at 1.1 s would read back 1.1000000238).
    seconds = dict(dtype=np.float64, encoding=tfds.features.Encoding.BYTES)
    return {
      "vid": tfds.features.Text(),
      "duration": tfds.features.Tensor(shape=(), **seconds),
      "qids": strings,
      "queries": strings,
      "query_index": tfds.features.Tensor(shape=(None,), dtype=np.int32),
      "windows": tfds.features.Tensor(shape=(None, 2), **seconds),
      "window_counts": tfds.features.Tensor(shape=(None,), dtype=np.int32),
    }

  def _record(self, clip_id: int, clip: RecordingRow) -> dict:
    queries = [query for _, query in clip.queries]
    return {
      "vid": clip.file_name,
      "duration": max(query.duration for query in queries),
      "qids": [query.qid for query in queries],
      "queries": list(clip.captions),
      "query_index": [index for index, _ in clip.queries],
      "windows": np.array([w for query in queries for w in query.windows], np.float64).reshape(-1, 2),
      "window_counts": [len(query.windows) for query in queries],
    }

  def _table_columns(self, clips: list[RecordingRow]) -> dict:
    """Column `records` of the split's table (`clip_builder.CLIPS_FILE`): the fields of each record but its waveform,
    so that `split_queries` reads no audio."""
    return {
      "records": [
        {
          key: value.tolist() if isinstance(value, np.ndarray) else value
          for key, value in self._record(i, clip).items()
        }
        for i, clip in enumerate(clips)
      ]
    }


def prepare_split(
  annotations: str, audio_dir: str, data_dir: str | None = None, *, workers: int | None = None
) -> MomentRecordings:
  """The prepared split of `annotations` and its recordings in `audio_dir`, in `data_dir` (default:
  `default_data_dir`): built unless complete and its sources unchanged (`clip_builder.prepare`; a prepared split
  whose folder is gone is used as it is). A FileNotFoundError when the annotation file is missing, or the folder is
  and nothing is prepared; a `clip_builder.NoUsableClip` when the folder is empty or no recording is usable."""
  annotations = os.path.abspath(os.path.expanduser(annotations))
  if not os.path.isfile(annotations):
    raise FileNotFoundError(f"annotation file {annotations} does not exist")
  builder = MomentRecordings(
    data_dir=os.path.expanduser(data_dir or default_data_dir(annotations)),
    config=config_for(annotations),
    workers=workers,
    audio_feature=audio_forms.WAVEFORM.name,
  )
  if not os.path.isdir(audio_dir):
    if not builder.is_prepared():
      raise FileNotFoundError(f"audio_dir {audio_dir} does not exist (the folder of the recordings of {annotations})")
  elif not os.listdir(audio_dir):
    raise clip_builder.NoUsableClip(f"audio_dir {audio_dir} is empty: no recording of {annotations}")
  return clip_builder.prepare(builder, audio_dir)


def fingerprint(builder: MomentRecordings) -> dict:
  """What the records of a prepared split depend on: the builder's version and the SHA-1 of its sources'
  fingerprint (`sources.json`)."""
  digest = hashlib.sha1((builder.data_path / clip_builder.SOURCES_FILE).read_bytes()).hexdigest()
  return {"version": str(builder.version), "sources_sha1": digest}


def records(builder: MomentRecordings, *, skip: int = 0):
  """The records of the prepared split as numpy dicts (strings as bytes), in the split's fixed order, the first
  `skip` left out."""
  dataset = builder.as_dataset(split=SPLIT, shuffle_files=False, read_config=tfds.ReadConfig(try_autocache=False))
  return tfds.as_numpy(dataset.skip(skip))


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else value


def record_queries(record: dict) -> list[tuple[int, MomentQuery]]:
  """(position in the annotation file, query) of each query of a record, as `records` reads it or as the split's
  table holds it (Clotho-Moment's `fg_db` is not kept)."""
  windows = np.asarray(record["windows"], np.float64).reshape(-1, 2)
  ends = np.cumsum(record["window_counts"], dtype=int)
  vid, duration = _text(record["vid"]), float(record["duration"])
  return [
    (
      int(index),
      MomentQuery(
        _text(qid), _text(text), vid, duration, tuple((float(s), float(e)) for s, e in windows[end - count : end])
      ),
    )
    for qid, text, index, count, end in zip(
      record["qids"], record["queries"], record["query_index"], record["window_counts"], ends
    )
  ]


def split_queries(builder: MomentRecordings) -> list[MomentQuery]:
  """The queries of the prepared split (those of skipped recordings left out) in the annotation file's order, from
  its table (no record is read)."""
  with open(builder.data_path / clip_builder.CLIPS_FILE, encoding="utf-8") as f:
    table = json.load(f)[SPLIT]["records"]
  numbered = [pair for record in table for pair in record_queries(record)]
  return [query for _, query in sorted(numbered, key=lambda pair: pair[0])]


def skipped_recordings(builder: MomentRecordings) -> list[tuple[str, str]]:
  """(vid, "reason: detail") of each recording the preparation skipped, from its report."""
  with open(clip_builder.report_path(builder), newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  return [
    (row["item"], f"{row['reason']}: {row['detail']}") for row in rows if row["outcome"] == extraction.SKIPPED_CLIP
  ]
