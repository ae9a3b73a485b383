"""TFDS builder that turns a Clotho v2.1-layout folder into log-mel TFRecords, and `prepare` that builds it once.

Raw layout (SPEC section 7), read from the builder's `manual_dir`: `clotho_captions_<split>.csv` with columns
`file_name,caption_1..caption_5` and the wavs under `<split>/<file_name>`, for the splits development, validation
and evaluation (a split is built when its CSV exists). Each record holds one clip: `log_mel` (frames, 64) float16
(`features.log_mel` of `features.load_audio`), its non-empty `captions`, `file_name`, and `clip_id` = its position
among the split's kept clips sorted by file name. Missing or unreadable audio and rows without a caption are skipped
and listed in a warning. TFDS writes into a temporary `incomplete.*` folder and renames it when complete, so a
killed preparation is redone on the next call and never read half-written.
"""
import csv
import hashlib
import io
import os
import re

import numpy as np
import tensorflow_datasets as tfds
import threadpoolctl
from absl import logging
from etils import epath

from data_pipelines import features

SPLITS = ("development", "validation", "evaluation")
FILE_NAME_COLUMN = "file_name"
_CAPTION_COLUMN = re.compile(r"caption(?:_(\d+))?")
_CSV_ENCODINGS = ("utf-8-sig", "cp1252", "latin-1")  # latin-1 decodes any byte string: the last resort.
_MAX_LISTED_SKIPS = 50


def captions_csv_path(raw_dir: str, split: str) -> str:
  return os.path.join(raw_dir, f"clotho_captions_{split}.csv")


def _decode(raw: bytes, path: str) -> str:
  for encoding in _CSV_ENCODINGS:
    try:
      text = raw.decode(encoding)
    except UnicodeDecodeError:
      continue
    if encoding != _CSV_ENCODINGS[0]:
      logging.warning("%s is not valid UTF-8; decoded it as %s", path, encoding)
    return text
  raise AssertionError("latin-1 decodes every byte string")


def read_captions_csv(path: str) -> list[tuple[str, list[str]]]:
  """(file_name, non-empty captions in column order) per data row of a Clotho captions CSV.

  Raises ValueError naming the CSV when the `file_name` column or every `caption[_k]` column is missing, or when a
  file name appears twice.
  """
  with open(path, "rb") as f:
    text = _decode(f.read(), path)
  reader = csv.reader(io.StringIO(text, newline=""))
  header = [name.strip() for name in next(reader, [])]
  if FILE_NAME_COLUMN not in header:
    raise ValueError(f"{path}: required column {FILE_NAME_COLUMN!r} is missing (header: {header})")
  caption_columns = sorted(
      (int(m.group(1) or 0), i) for i, name in enumerate(header) if (m := _CAPTION_COLUMN.fullmatch(name)))
  if not caption_columns:
    raise ValueError(f"{path}: required column 'caption_1' (or 'caption') is missing (header: {header})")
  name_index = header.index(FILE_NAME_COLUMN)
  rows, seen = [], set()
  for row in reader:
    if not any(cell.strip() for cell in row):
      continue  # Blank line.
    cells = [cell.strip() for cell in row] + [""] * (len(header) - len(row))
    file_name = cells[name_index]
    if file_name and file_name in seen:
      raise ValueError(f"{path}: file name {file_name!r} appears in more than one row")
    seen.add(file_name)
    rows.append((file_name, [cells[i] for _, i in caption_columns if cells[i]]))
  return rows


def _log_skips(split: str, skipped: list[str], kept: int) -> None:
  if not skipped:
    return
  listed = "\n  ".join(skipped[:_MAX_LISTED_SKIPS])
  more = f"\n  ... and {len(skipped) - _MAX_LISTED_SKIPS} more" if len(skipped) > _MAX_LISTED_SKIPS else ""
  logging.warning("clotho %s: skipped %d of %d rows:\n  %s%s", split, len(skipped), len(skipped) + kept, listed, more)


class Clotho(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Clotho v2.1 as log-mel clips with their captions (one record per clip)."""

  # TFDS 4.9.10 locates a builder defined outside its package through `importlib_resources`, a package it only
  # requires on Python < 3.9; naming the module file here skips that look-up.
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Log-mel (64 bins, 32 kHz, hop 320) float16 clips with all their captions."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download Clotho v2.1 (https://zenodo.org/records/4783391), extract the audio archives and put the "
      "clotho_captions_<split>.csv files next to the development/, validation/ and evaluation/ folders; pass that "
      "folder as the manual_dir.")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            # Raw bytes: 2 bytes a value (the default encoding stores a float list, 4 bytes a value).
            "log_mel": tfds.features.Tensor(shape=(None, features.N_MELS), dtype=np.float16,
                                            encoding=tfds.features.Encoding.BYTES),
            "captions": tfds.features.Tensor(shape=(None,), dtype=np.str_),
            "file_name": tfds.features.Text(),
            "clip_id": np.int32,
        }),
        homepage="https://zenodo.org/records/4783391",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    raw_dir = os.fspath(dl_manager.manual_dir)
    present = [split for split in SPLITS if os.path.isfile(captions_csv_path(raw_dir, split))]
    if not present:
      raise FileNotFoundError(
          f"{raw_dir} holds none of {[os.path.basename(captions_csv_path(raw_dir, s)) for s in SPLITS]}")
    # Read (and so validate) every CSV before anything is written.
    rows = {split: read_captions_csv(captions_csv_path(raw_dir, split)) for split in present}
    return {split: self._generate_examples(raw_dir, split, rows[split]) for split in present}

  def _generate_examples(self, raw_dir: str, split: str, rows: list[tuple[str, list[str]]]):
    # One BLAS thread: the small mel projection of each clip is ~3x slower with OpenBLAS's thread start-up.
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
      yield from self._examples(raw_dir, split, rows)

  def _examples(self, raw_dir: str, split: str, rows: list[tuple[str, list[str]]]):
    skipped, clip_id = [], 0
    for file_name, captions in sorted(rows):
      if not file_name:
        skipped.append(f"<row with an empty file_name> ({len(captions)} captions)")
        continue
      if not captions:
        skipped.append(f"{file_name}: no caption")
        continue
      path = os.path.join(raw_dir, split, file_name)
      if not os.path.isfile(path):
        skipped.append(f"{file_name}: audio file {path} is missing")
        continue
      try:
        log_mel = features.log_mel(features.load_audio(path))
      except features.AudioError as e:
        skipped.append(f"{file_name}: {e}")
        continue
      yield file_name, {"log_mel": log_mel.astype(np.float16), "captions": captions, "file_name": file_name,
                        "clip_id": clip_id}
      clip_id += 1
    _log_skips(split, skipped, clip_id)
    if clip_id == 0:
      raise ValueError(f"clotho {split}: no usable clip in {captions_csv_path(raw_dir, split)}")


def default_data_dir(raw_dir: str) -> str:
  """`~/.cache/atr_jax/prepared/<basename>-<8 hex of sha1(abspath)>`: one prepared folder per raw folder."""
  path = os.path.abspath(os.path.expanduser(raw_dir))
  digest = hashlib.sha1(path.encode("utf-8")).hexdigest()[:8]
  return os.path.join(os.path.expanduser("~/.cache/atr_jax/prepared"), f"{os.path.basename(path)}-{digest}")


def prepare(raw_dir: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """The `Clotho` builder of `data_dir`, built from `raw_dir` unless it is already complete (then instant).

  A folder left by a killed preparation is not complete (TFDS only renames its temporary folder at the end), so
  the build is redone; the leftover `incomplete.*` folders are reported for deletion.
  """
  builder = Clotho(data_dir=os.path.expanduser(data_dir))
  if builder.data_path.exists() and builder.is_prepared():
    return builder
  raw_dir = os.path.abspath(os.path.expanduser(raw_dir))
  if not os.path.isdir(raw_dir):
    raise FileNotFoundError(f"raw_dir {raw_dir} does not exist (expected a Clotho-layout folder)")
  leftovers = sorted(p for p in builder.data_path.parent.glob(f"{tfds.core.constants.INCOMPLETE_PREFIX}*"))
  if leftovers:
    logging.warning("Leftovers of interrupted preparations (delete them unless a preparation is running): %s", [os.fspath(p) for p in leftovers])
  logging.info("Preparing %s into %s", raw_dir, builder.data_path)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=raw_dir))
  return builder
