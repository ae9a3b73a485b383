"""TFDS builder of a Clotho v2.1 folder (records and preparation: `clip_builder`; where the files are: `layouts`), and
`prepare`.

Read from the builder's `manual_dir`, in whichever of its layouts it is (native, aac-datasets or reference, detected
and logged by `layouts`): for the splits development, validation and evaluation, a caption CSV with columns
`file_name,caption_1..caption_5` and the folder of its audio (a split is built when its CSV exists); and the DCASE
retrieval audio folder, every audio file of which becomes a caption-less record of split `retrieval` (the queries of
`retrieval_captions.csv` are not clip captions and are not read here).
"""

import os

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from data_pipelines import clip_builder, extraction, layouts
from data_pipelines.layouts import CLOTHO_SPLITS as SPLITS
from data_pipelines.layouts import RETRIEVAL_AUDIO_DIR  # noqa: F401  (part of this module's API)
from data_pipelines.layouts import RETRIEVAL_SPLIT

NAME = "clotho"


def captions_csv_path(raw_dir: str, split: str) -> str:
  """The caption CSV of `split` in the layout of `raw_dir` (the native layout's when it is in none yet)."""
  return layouts.find(NAME, raw_dir).splits[split].csv_path


class Clotho(clip_builder.CaptionedClips, skip_registration=True):
  """Clotho v2.1 as clips (log-mel or waveform: `audio_feature`) with their captions (one record per clip), plus the
  DCASE retrieval audio."""

  # TFDS 4.9.10 locates a builder defined outside its package through `importlib_resources`, a package it only
  # requires on Python < 3.9; naming the module file here skips that look-up.
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {
    "1.0.0": "Log-mel (64 bins, 32 kHz, hop 320) float16 clips with all their captions.",
    "1.1.0": "Parallel resumable preparation with a report; truncated and silent clips skipped, clips of one hop "
    "kept, a repeated file name keeps its first row; split `retrieval` from retrieval_audio/.",
    "1.2.0": "Silent clips kept (a note in the report); the fingerprint of the sources is stored (sources.json) and "
    "a dataset whose sources changed is prepared again.",
  }
  CSV_SPLITS = SPLITS
  captions_csv_path = staticmethod(captions_csv_path)
  HOMEPAGE = "https://zenodo.org/records/4783391"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download Clotho v2.1 (https://zenodo.org/records/4783391), extract the audio archives and put the "
    "clotho_captions_<split>.csv files next to the development/, validation/ and evaluation/ folders (and, for "
    "the DCASE retrieval split, the retrieval_audio/ folder); pass that folder as the manual_dir. The root of an "
    "aac-datasets download (holding CLOTHO_v2.1/) and the reference's data/Clotho folder are read as they are."
  )

  def _read_splits(self, raw_dir: str, report: extraction.Report) -> dict[str, list[clip_builder.ClipRow]]:
    layout = layouts.detect(NAME, raw_dir)
    logging.info("%s: %s is in the %s", NAME, raw_dir, layout.describe())
    tables = {}
    for split, source in layout.present_splits().items():
      if source.csv_path is None:
        tables[split] = clip_builder.folder_table(source.audio_dir, split, report)
        continue
      table = clip_builder.read_csv(source.csv_path, split, report)
      tables[split] = clip_builder.file_name_table(table, source.audio_dir, split, report)
    return {
      split: clip_builder.unique_clips(rows, split, report, need_captions=split != RETRIEVAL_SPLIT)
      for split, rows in tables.items()
    }


default_data_dir = Clotho.default_data_dir  # Part of this module's API.


def prepare(
  raw_dir: str,
  data_dir: str,
  workers: int | None = None,
  *,
  beam_options: str | None = None,
  check_sources: bool = True,
  audio_feature: str = "log_mel",
) -> Clotho:
  """The `Clotho` builder of `data_dir`, built from `raw_dir` unless complete and up to date
  (`clip_builder.prepare`), its records holding the audio form `audio_feature`; its clips extracted by a Beam
  pipeline when `beam_options` is not None."""
  builder = Clotho(
    data_dir=os.path.expanduser(data_dir), workers=workers, beam_options=beam_options, audio_feature=audio_feature
  )
  return clip_builder.prepare(builder, raw_dir, check_sources=check_sources)
