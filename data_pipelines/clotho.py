"""TFDS builder of a Clotho v2.1-layout folder (records and preparation: `clip_builder`), and `prepare`.

Raw layout (SPEC section 7), read from the builder's `manual_dir`: `clotho_captions_<split>.csv` with columns
`file_name,caption_1..caption_5` and the audio under `<split>/<file_name>`, for the splits development, validation
and evaluation (a split is built when its CSV exists); and the DCASE retrieval split: every audio file of
`retrieval_audio/` becomes a caption-less record of split `retrieval` (its `retrieval_captions.csv` holds queries,
not clip captions, and is not read here).
"""

import os

import tensorflow_datasets as tfds
from etils import epath

from data_pipelines import clip_builder, extraction
from data_pipelines.clip_builder import default_data_dir  # noqa: F401  (part of this module's API)

SPLITS = ("development", "validation", "evaluation")
RETRIEVAL_SPLIT = "retrieval"
RETRIEVAL_AUDIO_DIR = "retrieval_audio"


def captions_csv_path(raw_dir: str, split: str) -> str:
  return os.path.join(raw_dir, f"clotho_captions_{split}.csv")


class Clotho(clip_builder.CaptionedClips, skip_registration=True):
  """Clotho v2.1 as log-mel clips with their captions (one record per clip), plus the DCASE retrieval audio."""

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
    "the DCASE retrieval split, the retrieval_audio/ folder); pass that folder as the manual_dir."
  )

  def _read_splits(self, raw_dir: str, report: extraction.Report) -> dict[str, list[clip_builder.ClipRow]]:
    csvs = self.captions_csvs(raw_dir)
    retrieval_dir = os.path.join(raw_dir, RETRIEVAL_AUDIO_DIR)
    if not csvs and not os.path.isdir(retrieval_dir):
      raise FileNotFoundError(
        f"{raw_dir} holds none of {[os.path.basename(captions_csv_path(raw_dir, s)) for s in SPLITS]}"
      )
    tables = {}
    for split, csv_path in csvs.items():
      table = clip_builder.read_csv(csv_path, split, report)
      tables[split] = clip_builder.file_name_table(table, os.path.join(raw_dir, split), split, report)
    if os.path.isdir(retrieval_dir):
      tables[RETRIEVAL_SPLIT] = clip_builder.folder_table(retrieval_dir, RETRIEVAL_SPLIT, report)
    return {
      split: clip_builder.unique_clips(rows, split, report, need_captions=split != RETRIEVAL_SPLIT)
      for split, rows in tables.items()
    }


def prepare(raw_dir: str, data_dir: str, workers: int | None = None, *, check_sources: bool = True) -> Clotho:
  """The `Clotho` builder of `data_dir`, built from `raw_dir` unless complete and up to date
  (`clip_builder.prepare`)."""
  return clip_builder.prepare(
    Clotho(data_dir=os.path.expanduser(data_dir), workers=workers), raw_dir, check_sources=check_sources
  )
