"""TFDS builder of an AudioCaps folder (records and preparation: `clip_builder`; where the files are: `layouts`), and
`prepare`.

Read from the builder's `manual_dir`, in whichever of its layouts it is (native, aac-datasets or reference, detected
and logged by `layouts`): for the splits train, val and test, a caption CSV and the folder of its audio (a split is
built when its CSV exists). Each CSV is either
- official: `audiocap_id,youtube_id,start_time,caption`, one caption a row; rows with the same (youtube_id,
  start_time) are one clip, whose audio file name is the builder config's `file_pattern` filled with `{youtube_id}`,
  `{start_time}` and `{audiocap_id}` (the clip's first row's id) - copies of AudioCaps name their files differently;
  `prepare` takes the layout's naming (aac-datasets: `{youtube_id}_{start_time}.flac`) unless given another pattern
  than the default;
- renamed (the reference's): `file_name,caption_1..caption_5`, or `file_name,caption`, one caption a row (rows with
  the same file name are one clip).
Audio is fetched from YouTube by users, so missing files are normal: they are reported and skipped.

The file pattern is part of the builder's identity: each pattern has its own BuilderConfig (named from the pattern
and its hash), so its own folder `<data_dir>/audiocaps/<config>/<version>`, and a changed pattern is prepared anew
instead of being served from an older preparation.
"""

import dataclasses
import hashlib
import os
import re
import string
from collections.abc import Callable

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from data_pipelines import clip_builder, extraction, layouts
from data_pipelines.layouts import AUDIOCAPS_SPLITS as SPLITS

NAME = "audiocaps"
DEFAULT_FILE_PATTERN = "{youtube_id}.wav"
PATTERN_FIELDS = ("youtube_id", "start_time", "audiocap_id")
OFFICIAL_COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")


def captions_csv_path(raw_dir: str, split: str) -> str:
  """The caption CSV of `split` in the layout of `raw_dir` (the native layout's when it is in none yet)."""
  return layouts.find(NAME, raw_dir).splits[split].csv_path


def file_pattern_for(raw_dir: str, file_pattern: str) -> str:
  """`file_pattern`, or, when it is the default one, the naming of the layout of `raw_dir` if that layout has its own
  (aac-datasets)."""
  raw_dir = os.path.expanduser(raw_dir)
  if file_pattern != DEFAULT_FILE_PATTERN or not os.path.isdir(raw_dir):
    return file_pattern
  return layouts.find(NAME, raw_dir).file_pattern or file_pattern


def check_file_pattern(pattern: str) -> None:
  """A ValueError naming config.data.audiocaps_file_pattern unless `pattern` only uses the known fields and names
  each clip (it holds {youtube_id} or {audiocap_id})."""
  where = f"config.data.audiocaps_file_pattern (--audiocaps_file_pattern) {pattern!r}"
  try:
    fields = {
      field.split(".")[0].split("[")[0] for _, field, _, _ in string.Formatter().parse(pattern) if field is not None
    }
    pattern.format(youtube_id="x", start_time=30, audiocap_id=1)
  except (ValueError, KeyError, IndexError) as e:
    raise ValueError(f"{where} is not a valid pattern: {e}") from e
  if not fields <= set(PATTERN_FIELDS) or not fields & {"youtube_id", "audiocap_id"}:
    raise ValueError(
      f"{where} must use {{youtube_id}} or {{audiocap_id}} and no field other than "
      f"{', '.join('{' + f + '}' for f in PATTERN_FIELDS)}"
    )


@dataclasses.dataclass(eq=False)
class AudioCapsConfig(tfds.core.BuilderConfig):
  """How audio files are named for the official CSVs."""

  file_pattern: str = DEFAULT_FILE_PATTERN


def _config_name(pattern: str) -> str:
  readable = re.sub(r"[^A-Za-z0-9_.]+", "_", pattern.replace("{", "").replace("}", "")).strip("_")
  return f"{readable}-{hashlib.sha1(pattern.encode('utf-8')).hexdigest()[:8]}"


def _make_config(pattern: str) -> AudioCapsConfig:
  check_file_pattern(pattern)
  return AudioCapsConfig(
    name=_config_name(pattern), file_pattern=pattern, description=f"audio files named {pattern!r} (official CSVs)"
  )


def _cell_value(text: str) -> int | str:
  """Integer cells as int, so that a pattern may format them (`{start_time:06d}`)."""
  return int(text) if text.isdigit() else text


class AudioCaps(clip_builder.CaptionedClips, skip_registration=True):
  """AudioCaps as clips (log-mel or waveform: `audio_feature`) with their captions (one record per clip)."""

  name = NAME
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.0.0": "Log-mel (64 bins, 32 kHz, hop 320) float16 clips with all their captions.",
    "1.1.0": "Silent clips kept (a note in the report); the fingerprint of the sources is stored (sources.json) and "
    "a dataset whose sources changed (newly downloaded audio, say) is prepared again.",
  }
  BUILDER_CONFIGS = [_make_config(DEFAULT_FILE_PATTERN)]
  CSV_SPLITS = SPLITS
  captions_csv_path = staticmethod(captions_csv_path)
  HOMEPAGE = "https://audiocaps.github.io"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download the AudioCaps CSVs (https://github.com/cdjkim/audiocaps) and the audio of their YouTube clips; put "
    "train.csv, val.csv and test.csv next to the train/, val/ and test/ audio folders and pass that folder as "
    "the manual_dir (the root of an aac-datasets download, holding AUDIOCAPS/, and the reference's data/AudioCaps "
    "folder are read as they are). Set the file name pattern of your copy (default '{youtube_id}.wav', or "
    "aac-datasets' naming in its layout)."
  )

  @classmethod
  def config_for(cls, file_pattern: str) -> AudioCapsConfig:
    """The builder config of `file_pattern` (the predefined one for the default pattern)."""
    default = cls.BUILDER_CONFIGS[0]
    return default if file_pattern == default.file_pattern else _make_config(file_pattern)

  def _read_splits(self, raw_dir: str, report: extraction.Report) -> dict[str, list[clip_builder.ClipRow]]:
    layout = layouts.detect(NAME, raw_dir)
    logging.info(
      "%s: %s is in the %s (official CSVs: audio files named %r)",
      NAME,
      raw_dir,
      layout.describe(),
      self.builder_config.file_pattern,
    )
    tables = {}
    for split, source in layout.present_splits().items():
      table = clip_builder.read_csv(source.csv_path, split, report)
      if layouts.schema(table, source) == layouts.OFFICIAL:
        tables[split] = self._official_table(table, source.audio_dir, split, report)
      elif len(table.caption_columns()) == 1:
        tables[split] = _caption_rows_table(table, source.audio_dir, split, report)
      else:
        tables[split] = clip_builder.file_name_table(table, source.audio_dir, split, report)
    return {split: clip_builder.unique_clips(rows, split, report, need_captions=True) for split, rows in tables.items()}

  def _official_table(
    self, table: clip_builder.CsvTable, audio_dir: str, split: str, report: extraction.Report
  ) -> list[clip_builder.ClipRow]:
    ids, youtube, start, caption = (table.column(name) for name in OFFICIAL_COLUMNS)
    table.note_extra_columns([ids, youtube, start, caption], split, report)
    groups = {}  # (youtube_id, start_time), or the line for a row without a youtube_id -> its rows, in CSV order.
    for line, cells in table.rows:
      groups.setdefault((cells[youtube], cells[start]) if cells[youtube] else line, []).append((line, cells))
    named = []
    for rows in groups.values():
      first = rows[0][1]
      named.append((self._file_name(first[youtube], first[start], first[ids]) if first[youtube] else "", rows))
    return _grouped_clips(
      named,
      caption,
      lambda line, cells: f"caption of audiocap_id {cells[ids]!r} ({table.where(line)})",
      audio_dir,
      split,
      report,
    )

  def _file_name(self, youtube_id: str, start_time: str, audiocap_id: str) -> str:
    try:
      return self.builder_config.file_pattern.format(
        youtube_id=youtube_id, start_time=_cell_value(start_time), audiocap_id=_cell_value(audiocap_id)
      )
    except (ValueError, TypeError):  # e.g. `{start_time:06d}` on a start_time that is not an integer.
      return ""


def _grouped_clips(
  groups: list[tuple[str, list[tuple[int, list[str]]]]],
  caption: int,
  label: Callable[[int, list[str]], str],
  audio_dir: str,
  split: str,
  report: extraction.Report,
) -> list[clip_builder.ClipRow]:
  """A clip per (file name, CSV rows) group, with the non-empty cells of column `caption` of its rows as captions
  (an empty one reported under `label(line, cells)`)."""
  clips = []
  for file_name, rows in groups:
    first_line = rows[0][0]
    report.read(split, len(rows))
    captions = clip_builder.non_empty_captions(
      [(label(line, cells), cells[caption]) for line, cells in rows], file_name or f"line {first_line}", split, report
    )
    clips.append(clip_builder.ClipRow(file_name, os.path.join(audio_dir, file_name), captions, first_line))
  return clips


def _caption_rows_table(
  table: clip_builder.CsvTable, audio_dir: str, split: str, report: extraction.Report
) -> list[clip_builder.ClipRow]:
  """Clips of a `file_name,caption` CSV, one caption a row: the rows of one file name are one clip."""
  name, (caption,) = table.column(clip_builder.FILE_NAME_COLUMN), table.caption_columns()
  table.note_extra_columns([name, caption], split, report)
  groups = {}  # File name, or the line for a row without one -> its rows, in CSV order.
  for line, cells in table.rows:
    groups.setdefault(cells[name] or line, []).append((line, cells))
  return _grouped_clips(
    [(rows[0][1][name], rows) for rows in groups.values()],
    caption,
    lambda line, cells: f"{table.header[caption]} ({table.where(line)})",
    audio_dir,
    split,
    report,
  )


def prepare(
  raw_dir: str,
  data_dir: str,
  file_pattern: str = DEFAULT_FILE_PATTERN,
  workers: int | None = None,
  *,
  beam_options: str | None = None,
  check_sources: bool = True,
  audio_feature: str = "log_mel",
) -> AudioCaps:
  """The `AudioCaps` builder of `data_dir` for `file_pattern` (`file_pattern_for` the layout of `raw_dir`), built from
  `raw_dir` unless complete and up to date (`clip_builder.prepare`), its records holding the audio form
  `audio_feature`."""
  config = AudioCaps.config_for(file_pattern_for(raw_dir, file_pattern))
  builder = AudioCaps(
    data_dir=os.path.expanduser(data_dir),
    config=config,
    workers=workers,
    beam_options=beam_options,
    audio_feature=audio_feature,
  )
  return clip_builder.prepare(builder, raw_dir, check_sources=check_sources)
