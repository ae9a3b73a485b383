"""The TFDS builder base shared by the raw-dataset layouts (Clotho, AudioCaps), its CSV helpers and `prepare`.

Record schema (one record per clip, every split): the clip's audio in the builder's audio form (`audio_feature`,
`audio_forms`), stored as raw bytes under the form's name: either `log_mel` (frames, 64) float16, the log-mel of
`features.log_mel`, or `waveform` (samples,) int16, the 32 kHz mono samples at full scale 32767; then `captions` (n,)
raw caption strings (empty for an audio-only split), `file_name`, and `clip_id` = the clip's position among the
split's written clips sorted by file name. The two forms are prepared into different folders
(`CaptionedClips.default_data_dir`) with different feature-cache entries; a record holds one form only. A subclass may
hold other fields beside the audio (`_record_features`, `_record`: the moment builder's recordings and their queries).

A subclass turns its raw layout into `ClipRow`s per split (`_read_splits`, with the CSV helpers below: every CSV is
read and its columns checked before any audio is touched). Preparation then
1. drops empty captions and skips rows without a file name, without a caption, or repeating a file name (the first
   row is kept);
2. extracts every clip's stored array (log-mel or waveform) on all cores into the feature cache (`extraction`,
   resumable), or on an Apache Beam runner when the builder has `beam_options` (`beam_generation`: the same per-clip
   code, the same outcomes). A folder of its own has its cache beside its version folder; the default folders
   (`CaptionedClips.default_data_dir`) of one dataset and audio form share one, `shared_feature_cache_dir`, so that
   the folder of an edited caption CSV is prepared from the entries its predecessor left;
3. writes the good clips from the cache through TFDS, which writes into an `incomplete.*` folder renamed only once
   complete, together with `preparation_report.csv`, the counts (`info.metadata["preparation"]`), `sources.json`,
   the fingerprint of the sources read (`read_sources`), and `feature_cache.json`, the cache entries the records were
   written from. A split without a single good clip is left out (with a warning);
4. prunes the feature cache (`_prune_feature_cache`) to the entries listed by the complete datasets that use it: a
   folder's own cache keeps the clips last read; the shared cache keeps those of every default folder of the dataset
   and form still on disk, so that folders used in turn never decode each other's clips again.
Nothing about a bad input stops the run except a CSV missing a required column (a ValueError naming it and the file).

`prepare` compares a prepared dataset's fingerprint with its sources' and prepares again when they differ (logging
what changed): into a staging folder beside the dataset, which replaces it only once complete, the feature cache
sparing the decoding of every file but the new and modified ones.
"""

import abc
import collections
import csv
import dataclasses
import glob
import hashlib
import io
import json
import os
import re
import shutil

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from data_pipelines import audio_forms, extraction, features

# The default data dirs' root (`CaptionedClips.default_data_dir`), under the user's home, and the folder in it of the
# feature caches they share (`CaptionedClips.shared_feature_cache_dir`).
PREPARED_ROOT = "~/.cache/atr_jax/prepared"
SHARED_CACHE_FOLDER = "feature_cache"
REPORT_FILE = "preparation_report.csv"
SOURCES_FILE = "sources.json"
CACHE_ENTRIES_FILE = "feature_cache.json"  # The names of the feature-cache entries a dataset's records came from.
# Per split: the file name, captions and stored length of each clip (under the audio form's `length_key`: log-mel
# frames as "num_frames", waveform samples as "num_samples"), by clip id, and a subclass's own columns
# (`_table_columns`): what training and evaluation need to know of a split without reading its records.
CLIPS_FILE = "clips.json"
_STAGING_PREFIX, _REPLACED_PREFIX = "staging-", "replaced-"  # Beside the version folder: a re-preparation's places.
FILE_NAME_COLUMN = "file_name"
_CAPTION_COLUMN = re.compile(r"caption(?:_(\d+))?")
_FALLBACK_ENCODINGS = ("cp1252", "latin-1")  # latin-1 decodes any byte string: the last resort.
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclasses.dataclass(frozen=True)
class ClipRow:
  """One clip as the raw tables describe it: `captions` are its non-empty captions, `line` the CSV line it starts
  on (0 for a clip found in a folder)."""

  file_name: str
  audio_path: str
  captions: tuple[str, ...]
  line: int


@dataclasses.dataclass(frozen=True)
class CsvTable:
  """A decoded CSV: `header` lower-cased and stripped, `rows` (line number, stripped cells padded to the header's
  length) without blank rows."""

  path: str
  header: list[str]
  rows: list[tuple[int, list[str]]]

  def where(self, line: int) -> str:
    return f"{os.path.basename(self.path)} line {line}"

  def column(self, name: str) -> int:
    """Index of column `name`; a ValueError naming the column and the CSV when it is missing."""
    if name not in self.header:
      raise ValueError(f"{self.path}: required column {name!r} is missing (header: {self.header})")
    return self.header.index(name)

  def caption_columns(self) -> list[int]:
    """Indices of the `caption` / `caption_<k>` columns in k order; a ValueError when there is none."""
    found = sorted(
      (int(m.group(1) or 0), i) for i, name in enumerate(self.header) if (m := _CAPTION_COLUMN.fullmatch(name))
    )
    if not found:
      raise ValueError(f"{self.path}: required column 'caption_1' (or 'caption') is missing (header: {self.header})")
    return [i for _, i in found]

  def note_extra_columns(self, used: list[int], split: str, report: extraction.Report) -> None:
    for i, name in enumerate(self.header):
      if i not in used:
        report.note(
          split, os.path.basename(self.path), "extra_column", f"column {name or f'#{i + 1} (unnamed)'!r} ignored"
        )


def read_csv(path: str, split: str, report: extraction.Report) -> CsvTable:
  """The CSV at `path`, each line decoded as UTF-8, else cp1252, else latin-1 (noted in the report)."""
  with open(path, "rb") as f:
    raw = f.read().removeprefix(_UTF8_BOM)
  lines = []
  for number, line in enumerate(raw.split(b"\n"), 1):
    try:
      lines.append(line.decode("utf-8"))
      continue
    except UnicodeDecodeError:
      pass
    for encoding in _FALLBACK_ENCODINGS:
      try:
        lines.append(line.decode(encoding))
        break
      except UnicodeDecodeError:
        continue
    report.note(split, f"{os.path.basename(path)} line {number}", "csv_encoding", f"not UTF-8, decoded as {encoding}")
  reader = csv.reader(io.StringIO("\n".join(lines), newline=""))
  header = [name.strip().lower() for name in next(reader, [])]
  rows, line_number = [], reader.line_num
  for cells in reader:
    start, line_number = line_number + 1, reader.line_num
    if any(cell.strip() for cell in cells):
      rows.append((start, [cell.strip() for cell in cells] + [""] * (len(header) - len(cells))))
  return CsvTable(path, header, rows)


def non_empty_captions(
  cells: list[tuple[str, str]], item: str, split: str, report: extraction.Report
) -> tuple[str, ...]:
  """The non-empty texts of (label, text) caption cells; each empty one is reported as a skipped caption."""
  for label, text in cells:
    if not text:
      report.skip_caption(split, item, "empty_caption", f"{label} is empty")
  return tuple(text for _, text in cells if text)


def file_name_table(table: CsvTable, audio_dir: str, split: str, report: extraction.Report) -> list[ClipRow]:
  """Clips of a `file_name,caption_1..caption_5` (or `file_name,caption`) CSV, audio in `audio_dir/<file_name>`."""
  name_index, captions = table.column(FILE_NAME_COLUMN), table.caption_columns()
  table.note_extra_columns([name_index] + captions, split, report)
  clips = []
  for line, cells in table.rows:
    file_name = cells[name_index]
    report.read(split, len(captions))
    kept = non_empty_captions(
      [(f"{table.header[i]} ({table.where(line)})", cells[i]) for i in captions],
      file_name or f"line {line}",
      split,
      report,
    )
    clips.append(ClipRow(file_name, os.path.join(audio_dir, file_name), kept, line))
  return clips


def folder_table(audio_dir: str, split: str, report: extraction.Report) -> list[ClipRow]:
  """Caption-less clips: every audio file of `audio_dir` (by extension; other files are noted and ignored)."""
  clips, extensions = [], features.audio_extensions()
  for name in sorted(os.listdir(audio_dir)):
    if name.startswith("."):
      continue
    if os.path.splitext(name)[1].lower() not in extensions:
      report.note(split, name, "ignored_file", "not an audio file extension")
      continue
    report.read(split, 0)
    clips.append(ClipRow(name, os.path.join(audio_dir, name), (), 0))
  return clips


def unique_clips(clips: list[ClipRow], split: str, report: extraction.Report, *, need_captions: bool) -> list[ClipRow]:
  """`clips` without those lacking a file name (or a caption, when `need_captions`) and without repeated file names
  (the first row is kept), sorted by file name."""
  kept = {}
  for clip in clips:
    item = clip.file_name or f"line {clip.line}"
    if not clip.file_name:
      report.skip_clip(split, item, "no_file_name", f"line {clip.line} gives no file name", len(clip.captions))
    elif clip.file_name in kept:
      report.skip_clip(
        split,
        item,
        "duplicate_file_name",
        f"line {clip.line} repeats the file name of line {kept[clip.file_name].line}",
        len(clip.captions),
      )
    elif need_captions and not clip.captions:
      report.skip_clip(split, item, "no_caption", f"line {clip.line} has no non-empty caption", 0)
    else:
      kept[clip.file_name] = clip
  return [kept[name] for name in sorted(kept)]


def _sha1_of_file(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha1").hexdigest()


def _source_name(path: str, raw_dir: str) -> str:
  """A source's name in the fingerprint: its path relative to `raw_dir` when inside it (the name moves with the
  folder), else its absolute path (a file kept elsewhere, such as a WavCaps exclusion list, stays put when the raw
  folder moves)."""
  relative = os.path.relpath(path, raw_dir)
  return os.path.abspath(path) if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


def _form_suffix(form: audio_forms.AudioForm) -> str:
  """What a default folder's name (and its shared feature cache's) ends with for `form`: nothing for the log-mel."""
  return "" if form is audio_forms.LOG_MEL else f"-{form.name}"


def _size_and_mtime(path: str) -> list[int] | None:
  try:
    stat = os.stat(path)
  except OSError:
    return None
  return [stat.st_size, stat.st_mtime_ns]


def _change(before, after, changed: str) -> str:
  return "added" if before is None else "removed" if after is None else changed


def _describe_changes(stored: dict, current: dict) -> str:
  """What differs between two `read_sources` fingerprints, e.g. "train.csv edited; 3 audio files added, 1
  modified" ("" when nothing does)."""
  parts = [
    f"{name} {_change(stored['csv'].get(name), current['csv'].get(name), 'edited')}"
    for name in sorted(stored["csv"].keys() | current["csv"].keys())
    if stored["csv"].get(name) != current["csv"].get(name)
  ]
  audio = collections.Counter(
    _change(stored["audio"].get(path), current["audio"].get(path), "modified")
    for path in stored["audio"].keys() | current["audio"].keys()
    if stored["audio"].get(path) != current["audio"].get(path)
  )
  counts = [(audio[change], change) for change in ("added", "modified", "removed") if audio[change]]
  if counts:
    (first, change), rest = counts[0], counts[1:]
    parts.append(", ".join([f"{first} audio file{'s' * (first != 1)} {change}"] + [f"{n} {c}" for n, c in rest]))
  return "; ".join(parts)


class NoUsableClip(ValueError):
  """A preparation that found not a single good clip (its message holds the counts)."""


class CaptionedClips(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base builder: a subclass sets VERSION, RELEASE_NOTES, HOMEPAGE, MANUAL_DOWNLOAD_INSTRUCTIONS, `code_path`,
  CSV_SPLITS and `captions_csv_path` (the splits read from a caption CSV, and where; or overrides `captions_csvs`),
  and implements `_read_splits`.
  `workers` feature-extraction processes (default: one per core), or, with `beam_options` (the
  `--beam_pipeline_options` string, "" for the defaults), extraction by a Beam pipeline (`beam_generation`); the
  feature cache is `feature_cache_dir` (default: the one the default folders of the dataset and audio form share,
  `shared_feature_cache_dir`, when `data_dir` is such a folder, else `feature_cache` beside the version folder).
  `audio_feature` is the audio form the records hold ("log_mel" or "waveform", `audio_forms`)."""

  HOMEPAGE = ""
  CSV_SPLITS: tuple[str, ...] = ()

  def __init__(
    self,
    *,
    workers: int | None = None,
    beam_options: str | None = None,
    feature_cache_dir: str | None = None,
    audio_feature: str = "log_mel",
    **kwargs,
  ):
    self.audio_form = audio_forms.audio_form(audio_feature, key="audio_feature")  # `_info` (in __init__) needs it.
    super().__init__(**kwargs)
    self.workers = workers
    self.beam_options = beam_options
    if feature_cache_dir is None:
      default = self.is_default_data_dir(os.fspath(self.data_dir_root), self.audio_form.name)
      own = os.fspath(self.data_path.parent / "feature_cache")
      feature_cache_dir = self.shared_feature_cache_dir(self.audio_form.name) if default else own
    self.feature_cache_dir = feature_cache_dir

  @staticmethod
  def captions_csv_path(raw_dir: str, split: str) -> str:
    """The caption CSV of `split` in `raw_dir`: a subclass with CSV_SPLITS defines it (one without, such as the moment
    builder, names its sources in `captions_csvs`)."""
    raise NotImplementedError

  @classmethod
  def split_csvs(cls, raw_dir: str) -> dict[str, str]:
    """The caption CSV of each of CSV_SPLITS whose CSV exists in `raw_dir`, by split."""
    paths = {split: cls.captions_csv_path(raw_dir, split) for split in cls.CSV_SPLITS}
    return {split: path for split, path in paths.items() if os.path.isfile(path)}

  def captions_csvs(self, raw_dir: str) -> dict[str, str]:
    """The CSVs whose sha1 is part of the sources' fingerprint (`read_sources`): `split_csvs`, and whatever else a
    subclass reads."""
    return self.split_csvs(raw_dir)

  @classmethod
  def default_data_dir(cls, raw_dir: str, audio_feature: str = "log_mel") -> str:
    """`PREPARED_ROOT/<dataset>-<12 hex>` for the log-mel, with `-waveform` appended for the waveform: one prepared
    folder per dataset content and audio form, the hex a sha1 of the sha1 of each of `split_csvs` by split (the
    hashes of `read_sources`), never of where the folder lies or how it is laid out. A raw folder moved elsewhere
    keeps its prepared folder (its sources' fingerprint, relative to the folder, still matches) and one laid out anew
    is prepared again from the feature cache; a copy with the same caption CSVs shares them, and edited CSVs get a
    folder of their own, prepared from the feature cache every default folder of the dataset and form shares
    (`shared_feature_cache_dir`). A FileNotFoundError when `raw_dir` is not a folder."""
    form = audio_forms.audio_form(audio_feature)
    raw_dir = os.path.abspath(os.path.expanduser(raw_dir))
    if not os.path.isdir(raw_dir):
      raise FileNotFoundError(
        f"raw_dir {raw_dir} does not exist: the default prepared folder is named after its caption CSVs (to use a "
        "prepared folder without its raw folder, name it: config.data.data_dir, --out_dir)"
      )
    content = {split: _sha1_of_file(path) for split, path in cls.split_csvs(raw_dir).items()}
    digest = hashlib.sha1(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()[:12]
    return os.path.join(os.path.expanduser(PREPARED_ROOT), f"{cls.name}-{digest}{_form_suffix(form)}")

  @classmethod
  def default_data_dirs(cls, audio_feature: str) -> list[str]:
    """The default folders (`default_data_dir`) of this dataset and `audio_feature` on disk, sorted."""
    root = os.path.expanduser(PREPARED_ROOT)
    if not os.path.isdir(root):
      return []
    return sorted(entry.path for entry in os.scandir(root) if cls.is_default_data_dir(entry.path, audio_feature))

  @classmethod
  def is_default_data_dir(cls, data_dir: str, audio_feature: str) -> bool:
    """Whether `data_dir` is named as `default_data_dir` names the folders of this dataset and `audio_feature`."""
    suffix = _form_suffix(audio_forms.audio_form(audio_feature))
    path = os.path.abspath(os.path.expanduser(data_dir))
    return os.path.dirname(path) == os.path.abspath(os.path.expanduser(PREPARED_ROOT)) and bool(
      re.fullmatch(rf"{re.escape(cls.name)}-[0-9a-f]{{12}}{re.escape(suffix)}", os.path.basename(path))
    )

  @classmethod
  def shared_feature_cache_dir(cls, audio_feature: str) -> str:
    """`PREPARED_ROOT/feature_cache/<dataset>` for the log-mel (`-waveform` appended for the waveform): the feature
    cache of every default folder of this dataset and `audio_feature`. Its entries are known by split, file name,
    size and modification time (`extraction`), whichever folder's caption CSVs listed the clip."""
    form = audio_forms.audio_form(audio_feature)
    return os.path.join(os.path.expanduser(PREPARED_ROOT), SHARED_CACHE_FOLDER, f"{cls.name}{_form_suffix(form)}")

  @abc.abstractmethod
  def _read_splits(self, raw_dir: str, report: extraction.Report) -> dict[str, list[ClipRow]]:
    """Clips to extract per split of the raw folder: every CSV checked first, every clip counted with
    `report.read`, then filtered by `unique_clips`."""

  def read_sources(self, raw_dir: str, report: extraction.Report) -> tuple[dict[str, list[ClipRow]], dict]:
    """The clips per split (`_read_splits`) and the fingerprint of their sources: {"csv": sha1 of each of
    `captions_csvs`, "audio": [size, mtime in ns] of each clip's audio file (None when missing)}, keyed by path
    relative to `raw_dir` (absolute outside it: `_source_name`). The CSVs are hashed before they are parsed and the
    audio files stat'ed (never read) before any is decoded, so that a source changed meanwhile shows as changed next
    time."""
    csvs = {_source_name(path, raw_dir): _sha1_of_file(path) for path in self.captions_csvs(raw_dir).values()}
    tables = self._read_splits(raw_dir, report)
    audio = {
      os.path.relpath(clip.audio_path, raw_dir): _size_and_mtime(clip.audio_path)
      for clips in tables.values()
      for clip in clips
    }
    return tables, {"csv": csvs, "audio": audio}

  def source_changes(self, raw_dir: str) -> str:
    """What changed in the sources in `raw_dir` since this complete dataset was prepared ("" when nothing did)."""
    try:
      with open(self.data_path / SOURCES_FILE, encoding="utf-8") as f:
        stored = json.load(f)
    except FileNotFoundError:
      return f"no {SOURCES_FILE}: prepared by an older version"
    if not (self.data_path / CLIPS_FILE).exists():
      return f"no {CLIPS_FILE}: prepared by an older version"
    return _describe_changes(stored, self.read_sources(raw_dir, extraction.Report(self.name))[1])

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.__class__.__doc__,
      features=tfds.features.FeaturesDict(
        {
          # Raw bytes: 2 bytes a value (the default encoding stores a float or int list, 4 bytes or more a value).
          self.audio_form.name: tfds.features.Tensor(
            shape=(None, *self.audio_form.row_shape),
            dtype=self.audio_form.stored_dtype,
            encoding=tfds.features.Encoding.BYTES,
          ),
          **self._record_features(),
        }
      ),
      homepage=self.HOMEPAGE,
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    raw_dir = os.fspath(dl_manager.manual_dir)
    report = extraction.Report(self.name)
    tables, sources = self.read_sources(raw_dir, report)
    outcomes = self._extract(tables)
    written = {split: self._good_clips(split, clips, outcomes[split], report) for split, clips in tables.items()}
    with open(os.path.join(self.data_dir, CACHE_ENTRIES_FILE), "w", encoding="utf-8") as f:
      json.dump(sorted({os.path.basename(path) for clips in written.values() for _, path in clips}), f)
    report.write_csv(os.path.join(self.data_dir, REPORT_FILE))
    with open(os.path.join(self.data_dir, SOURCES_FILE), "w", encoding="utf-8") as f:
      json.dump(sources, f)
    clip_tables = {
      split: {
        "file_names": [clip.file_name for clip, _ in clips],
        "captions": [list(clip.captions) for clip, _ in clips],
        self.audio_form.length_key: [extraction.stored_length(path) for _, path in clips],
        **self._table_columns([clip for clip, _ in clips]),
      }
      for split, clips in written.items()
      if clips
    }
    with open(os.path.join(self.data_dir, CLIPS_FILE), "w", encoding="utf-8") as f:
      json.dump(clip_tables, f, ensure_ascii=False)
    self.info.metadata["preparation"] = report.counts
    summary = extraction.format_summary(self.name, report.counts)
    for split, clips in written.items():
      if not clips:
        logging.warning("%s %s: no usable clip, the split is left out", self.name, split)
    if not any(written.values()):
      raise NoUsableClip(f"{raw_dir}: no usable clip in any split of {self.name}:\n{summary}")
    return {split: self._generate_examples(clips) for split, clips in written.items() if clips}

  def _extract(self, tables: dict[str, list[ClipRow]]) -> dict[str, list[extraction.AudioOutcome]]:
    """The extraction outcome of every clip of `tables`, by split in the clips' order. The feature cache knows a clip
    by `<split>/<file name>` (`extraction.extract`), so that the raw folder moved or laid out anew is served from it."""
    names = {clip.audio_path: f"{split}/{clip.file_name}" for split, clips in tables.items() for clip in clips}
    if self.beam_options is None:
      with extraction.Extractor(self.feature_cache_dir, self.workers, self.audio_form.name) as extractor:
        return {
          split: extractor.run([clip.audio_path for clip in clips], desc=f"{self.name} {split}", names=names)
          for split, clips in tables.items()
        }
    beam_generation = import_beam_generation()
    options = beam_generation.parse_options(self.beam_options, self.workers)
    paths = [clip.audio_path for clips in tables.values() for clip in clips]
    logging.info(
      "%s: extracting %d clips with Apache Beam (%s)", self.name, len(paths), self.beam_options or "defaults"
    )
    by_path = beam_generation.extract(paths, self.feature_cache_dir, options, self.audio_form.name, names)
    return {split: [by_path[clip.audio_path] for clip in clips] for split, clips in tables.items()}

  @staticmethod
  def _good_clips(
    split: str, clips: list[ClipRow], outcomes: list[extraction.AudioOutcome], report: extraction.Report
  ) -> list[tuple[ClipRow, str]]:
    good = []
    for clip, outcome in zip(clips, outcomes, strict=True):
      for kind, detail in outcome.notes:
        report.note(split, clip.file_name, kind, detail)
      if outcome.cache_path is None:
        report.skip_clip(split, clip.file_name, outcome.reason, outcome.detail, len(clip.captions))
      else:
        report.written(split, len(clip.captions))
        good.append((clip, outcome.cache_path))
    return good

  def _record_features(self) -> dict:
    """The features of a record beside its audio: `captions`, `file_name` and `clip_id`."""
    return {
      "captions": tfds.features.Tensor(shape=(None,), dtype=np.str_),
      "file_name": tfds.features.Text(),
      "clip_id": np.int32,
    }

  def _record(self, clip_id: int, clip: ClipRow) -> dict:
    """The values of `_record_features` for `clip`, the `clip_id`-th written clip of its split."""
    return {"captions": list(clip.captions), "file_name": clip.file_name, "clip_id": clip_id}

  def _table_columns(self, clips: list[ClipRow]) -> dict:
    """More columns of a split's table in CLIPS_FILE, each a list with an entry per written clip: none here."""
    return {}

  def _generate_examples(self, clips: list[tuple[ClipRow, str]]):
    for clip_id, (clip, cache_path) in enumerate(clips):
      yield clip.file_name, {self.audio_form.name: extraction.load_clip(cache_path), **self._record(clip_id, clip)}


def import_beam_generation():
  """The `beam_generation` module; an ImportError saying how to install apache-beam, an optional dependency
  (atr-jax[beam]), when it is missing."""
  try:
    from data_pipelines import beam_generation
  except ImportError as e:
    raise ImportError(f"extraction on Apache Beam needs apache-beam: pip install 'atr-jax[beam]' ({e})") from e
  return beam_generation


def _same_builder(builder: CaptionedClips, data_dir: str, **kwargs) -> CaptionedClips:
  return type(builder)(
    data_dir=os.fspath(data_dir),
    config=builder.builder_config,
    workers=builder.workers,
    beam_options=builder.beam_options,
    audio_feature=builder.audio_form.name,
    **kwargs,
  )


def _beside(data_path: os.PathLike, prefix: str) -> str:
  return os.path.join(os.path.dirname(data_path), prefix + os.path.basename(data_path))


def _settle_swap(data_path: os.PathLike) -> bool:
  """Ends a replacement of the dataset at `data_path` cut short: the replaced dataset comes back unless its
  replacement is in place (then it is deleted). Whether it came back."""
  replaced = _beside(data_path, _REPLACED_PREFIX)
  if not os.path.exists(replaced):
    return False
  if os.path.exists(data_path):
    shutil.rmtree(replaced)
    return False
  os.rename(replaced, data_path)
  return True


def _check_audio_form(builder: CaptionedClips) -> None:
  """A ValueError when the complete dataset of `builder` holds another audio form than the builder's own."""
  try:
    stored = json.loads((builder.data_path / "features.json").read_text())["featuresDict"]["features"]
  except (OSError, KeyError, TypeError, ValueError):
    return
  if builder.audio_form.name not in stored:
    held = [name for name in audio_forms.AUDIO_FORMS if name in stored] or sorted(stored)
    raise ValueError(
      f"{builder.data_path} holds {', '.join(held)} records, not {builder.audio_form.name} (audio_feature): prepare "
      "each audio form into its own folder (CaptionedClips.default_data_dir)"
    )


def _prune_feature_cache(builder: CaptionedClips) -> None:
  """Deletes the entries of the prepared `builder`'s feature cache that no complete dataset using it lists
  (`CACHE_ENTRIES_FILE`): those of the builder alone for a cache of its own; for the shared cache of the default
  folders (`CaptionedClips.shared_feature_cache_dir`), those of every dataset (any config, version or leftover) in a
  default folder of the dataset and audio form. A deleted default folder gives its entries up at the next
  preparation of another; one still on disk keeps them, whichever folder was prepared last."""
  cache_dir = builder.feature_cache_dir
  if cache_dir == builder.shared_feature_cache_dir(builder.audio_form.name):
    folders = builder.default_data_dirs(builder.audio_form.name)
    listings = [
      path for folder in folders for path in glob.glob(f"{glob.escape(folder)}/**/{CACHE_ENTRIES_FILE}", recursive=True)
    ]
  else:
    listings = [os.fspath(builder.data_path / CACHE_ENTRIES_FILE)]
  used = set()
  for listing in listings:
    try:
      with open(listing, encoding="utf-8") as f:
        used.update(os.path.join(cache_dir, name) for name in json.load(f))
    except (OSError, ValueError) as e:  # A leftover of a killed preparation, say: its entries are not kept.
      logging.warning("%s: unreadable, the feature cache entries it lists are not kept (%s)", listing, e)
  extraction.keep_only(cache_dir, used)


def _prepare_again(builder: CaptionedClips, raw_dir: str) -> CaptionedClips:
  """`builder` prepared again into a staging folder, then moved in place of its complete dataset (which is kept
  until the replacement is complete, and restored by `_settle_swap` if the move is cut short)."""
  data_path = os.fspath(builder.data_path)
  staging_dir = _beside(data_path, _STAGING_PREFIX)
  shutil.rmtree(staging_dir, ignore_errors=True)  # A killed re-preparation's (what it extracted is in the cache).
  staged = _same_builder(builder, staging_dir, feature_cache_dir=builder.feature_cache_dir)
  staged.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=raw_dir))
  replaced = _beside(data_path, _REPLACED_PREFIX)
  os.rename(data_path, replaced)
  os.rename(staged.data_path, data_path)
  shutil.rmtree(replaced)
  shutil.rmtree(staging_dir)
  return _same_builder(builder, builder.data_dir_root)


def prepare(builder: CaptionedClips, raw_dir: str, *, check_sources: bool = True) -> CaptionedClips:
  """`builder` (or a new builder of the same dataset), built from `raw_dir` unless it is complete and its sources
  are those it was prepared from (`source_changes`: the CSVs are hashed, the audio files stat'ed, none is read). A
  complete dataset of another audio form than the builder's is a ValueError naming both.

  Sources changed since: the dataset is prepared again (what changed is logged), replacing the complete one only
  once complete itself; the feature cache spares decoding the unchanged clips. `check_sources=False` takes a
  complete dataset as it is (the other processes of a job, once process 0 prepared it). A folder left by a killed
  preparation is not complete (TFDS renames its temporary folder only at the end): the build is redone, reusing the
  features the killed run cached; leftover `incomplete.*` folders are reported.
  """
  raw_dir = os.path.abspath(os.path.expanduser(raw_dir))
  if _settle_swap(builder.data_path):
    builder = _same_builder(builder, builder.data_dir_root)  # `builder` read its info before the dataset was back.
  prepared = builder.is_prepared()
  if prepared:
    _check_audio_form(builder)
  if prepared and not check_sources:
    return builder
  if not os.path.isdir(raw_dir):
    if prepared:
      logging.warning(
        "%s: raw_dir %s does not exist: using %s as prepared, its sources unchecked",
        builder.name,
        raw_dir,
        builder.data_path,
      )
      return builder
    raise FileNotFoundError(f"raw_dir {raw_dir} does not exist (expected a {builder.name}-layout folder)")
  if prepared:
    changes = builder.source_changes(raw_dir)
    if not changes:
      return builder
    logging.warning("%s: sources changed since preparation (%s): preparing again", builder.name, changes)
    builder = _prepare_again(builder, raw_dir)
  else:
    leftovers = sorted(builder.data_path.parent.glob(f"{tfds.core.constants.INCOMPLETE_PREFIX}*"))
    if leftovers:
      logging.warning(
        "Leftovers of interrupted preparations (delete them unless a preparation is running): %s",
        [os.fspath(p) for p in leftovers],
      )
    logging.info("Preparing %s into %s", raw_dir, builder.data_path)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=raw_dir))
  _prune_feature_cache(builder)
  logging.info(
    "%s\nreport: %s",
    extraction.format_summary(builder.name, builder.info.metadata["preparation"]),
    report_path(builder),
  )
  return builder


def report_path(builder: CaptionedClips) -> str:
  return os.fspath(builder.data_path / REPORT_FILE)
