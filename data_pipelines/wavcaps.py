"""TFDS builder of a WavCaps folder (records and preparation: `clip_builder`; where the files are: `layouts`), and
`prepare`.

Read from the builder's `manual_dir`, in whichever of its layouts it is (native or aac-datasets, detected and logged by
`layouts`): one split `train`, made of the sources AudioSet_SL, BBC_Sound_Effects, FreeSound and SoundBible (those
whose JSON exists). Each JSON holds `{"data": [entry, ...]}`, an entry a clip with its `id` and one `caption` (its
other keys, `duration` among them, are not read); the clip's audio is `layouts.wavcaps_file_name(source, id)` in the
source's audio folder, and its record's file name `<source>/<audio file name>` (a repeated id keeps its first entry;
the report's "line" of a clip is its entry number). Clips of any length are stored whole (training crops them at random
each epoch).

FreeSound clips whose id is in the builder config's exclusion CSV (a column `id`, e.g. aac-datasets'
`blacklist_clotho.full.csv`: the Freesound clips of Clotho's evaluation data) are skipped as `excluded_id`. The
exclusion list is part of the builder's identity (each list has its own BuilderConfig, named from its path, so its
own folder) and of its sources' fingerprint (an edited list prepares the dataset again).
"""

import dataclasses
import hashlib
import json
import os
import re

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from data_pipelines import clip_builder, extraction, layouts
from data_pipelines.layouts import WAVCAPS_JSONS as SOURCES
from data_pipelines.layouts import WAVCAPS_SPLIT as SPLIT

NAME = "wavcaps"
EXCLUDED_SOURCE = "FreeSound"  # The source whose ids the exclusion CSV lists.
EXCLUDE_ID_COLUMN = "id"
EXCLUDED = "excluded_id"
_EXCLUSION_KEY = "exclude_csv"  # The exclusion CSV among `captions_csvs`, beside the sources.


def source_json_path(raw_dir: str, source: str) -> str:
  """The JSON of WavCaps source `source` in the layout of `raw_dir` (the native layout's when it is in none yet)."""
  return layouts.find(NAME, raw_dir).splits[SPLIT].sources[source].csv_path


@dataclasses.dataclass(eq=False)
class WavCapsConfig(tfds.core.BuilderConfig):
  """The FreeSound exclusion CSV (an absolute path; "" for none)."""

  exclude_csv: str = ""


def _make_config(exclude_csv: str) -> WavCapsConfig:
  if not exclude_csv:
    return WavCapsConfig(name="all", description="every clip")
  path = os.path.abspath(os.path.expanduser(exclude_csv))
  readable = re.sub(r"[^A-Za-z0-9_.]+", "_", os.path.splitext(os.path.basename(path))[0]).strip("_")
  return WavCapsConfig(
    name=f"exclude-{readable}-{hashlib.sha1(path.encode('utf-8')).hexdigest()[:8]}",
    exclude_csv=path,
    description=f"FreeSound ids listed in {path} excluded",
  )


def _json_entries(path: str) -> list[dict]:
  """The entries of a WavCaps JSON; a ValueError naming the file when it is not `{"data": [object, ...]}`."""
  with open(path, "rb") as f:
    try:
      data = json.load(f)
    except ValueError as e:
      raise ValueError(f"{path}: not a JSON file: {e}") from e
  entries = data.get("data") if isinstance(data, dict) else None
  if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
    raise ValueError(f'{path}: expected {{"data": [entry, ...]}} with an object per clip')
  return entries


def _text(value) -> str:
  return str(value).strip() if isinstance(value, str | int) else ""


class WavCaps(clip_builder.CaptionedClips, skip_registration=True):
  """WavCaps (AudioSet_SL, BBC Sound Effects, FreeSound, SoundBible) as clips (log-mel or waveform:
  `audio_feature`) with their caption."""

  name = NAME
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Log-mel (64 bins, 32 kHz, hop 320) float16 clips of the four sources, one caption each."}
  BUILDER_CONFIGS = [_make_config("")]
  CSV_SPLITS = tuple(SOURCES)  # The fingerprinted JSONs, one a source.
  captions_csv_path = staticmethod(source_json_path)
  HOMEPAGE = "https://huggingface.co/datasets/cvssp/WavCaps"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download WavCaps (https://huggingface.co/datasets/cvssp/WavCaps): keep its json_files/ folder and extract each "
    "source's flac files into Audio/<source>/ beside it; pass that folder as the manual_dir (the root of an "
    "aac-datasets download, holding WavCaps/, is read as it is). Pass the Freesound ids to keep out of training "
    "(Clotho's evaluation clips) as a CSV with a column 'id'."
  )

  @classmethod
  def config_for(cls, exclude_csv: str) -> WavCapsConfig:
    """The builder config of `exclude_csv` (the predefined one for none)."""
    return cls.BUILDER_CONFIGS[0] if not exclude_csv else _make_config(exclude_csv)

  def captions_csvs(self, raw_dir: str) -> dict[str, str]:
    """The JSON of each source present, and the exclusion CSV (their sha1s are part of the sources' fingerprint)."""
    exclude_csv = self.builder_config.exclude_csv
    return super().captions_csvs(raw_dir) | ({_EXCLUSION_KEY: exclude_csv} if exclude_csv else {})

  def _excluded_ids(self, report: extraction.Report) -> set[str]:
    if not self.builder_config.exclude_csv:
      return set()
    table = clip_builder.read_csv(self.builder_config.exclude_csv, SPLIT, report)
    column = table.column(EXCLUDE_ID_COLUMN)
    return {cells[column] for _, cells in table.rows if cells[column]}

  def _read_splits(self, raw_dir: str, report: extraction.Report) -> dict[str, list[clip_builder.ClipRow]]:
    layout = layouts.detect(NAME, raw_dir)
    logging.info("%s: %s is in the %s", NAME, raw_dir, layout.describe())
    excluded = self._excluded_ids(report)
    entries = {
      source: _json_entries(part.csv_path) for source, part in layout.splits[SPLIT].sources.items() if part.present()
    }  # Every JSON is checked before any clip is counted.
    clips = []
    for source, source_entries in entries.items():
      part = layout.splits[SPLIT].sources[source]
      for number, entry in enumerate(source_entries, 1):
        clip_id, item = _text(entry.get("id")), f"{os.path.basename(part.csv_path)} entry {number}"
        report.read(SPLIT, 1)
        captions = clip_builder.non_empty_captions(
          [(f"caption of {item}", _text(entry.get("caption")))], item, SPLIT, report
        )
        if not clip_id:
          report.skip_clip(SPLIT, item, "no_file_name", f"{item} has no id", len(captions))
          continue
        file_name = f"{source}/{layouts.wavcaps_file_name(source, clip_id)}"
        if source == EXCLUDED_SOURCE and clip_id in excluded:
          report.skip_clip(SPLIT, file_name, EXCLUDED, f"{item}: Freesound id {clip_id} is excluded", len(captions))
        elif not captions:
          report.skip_clip(SPLIT, file_name, "no_caption", f"{item} has no non-empty caption", 0)
        else:
          audio_path = os.path.join(part.audio_dir, os.path.basename(file_name))
          clips.append(clip_builder.ClipRow(file_name, audio_path, captions, number))
    return {SPLIT: clip_builder.unique_clips(clips, SPLIT, report, need_captions=True)}


def prepare(
  raw_dir: str,
  data_dir: str,
  exclude_csv: str = "",
  workers: int | None = None,
  *,
  beam_options: str | None = None,
  check_sources: bool = True,
  audio_feature: str = "log_mel",
) -> WavCaps:
  """The `WavCaps` builder of `data_dir` for the exclusion CSV `exclude_csv` ("" for none), built from `raw_dir`
  unless complete and up to date (`clip_builder.prepare`), its records holding the audio form `audio_feature`."""
  if exclude_csv and not os.path.isfile(os.path.expanduser(exclude_csv)):
    raise FileNotFoundError(f"config.data.wavcaps_exclude_csv (--wavcaps_exclude_csv) {exclude_csv!r} does not exist")
  config = WavCaps.config_for(exclude_csv)
  builder = WavCaps(
    data_dir=os.path.expanduser(data_dir),
    config=config,
    workers=workers,
    beam_options=beam_options,
    audio_feature=audio_feature,
  )
  return clip_builder.prepare(builder, raw_dir, check_sources=check_sources)
