"""Where each split of a raw dataset folder is, in every folder layout a dataset is read from, and which layout a
folder is in (`detect`): the one place that knows raw folder and file names.

A layout maps each of our splits to a `SplitSource`: its caption CSV, the folder the CSV's file names are in and the
CSV schemas it may hold; or to a `MultiSource`, a `SplitSource` per source (WavCaps' one split `train`: each
source's JSON and audio folder). The layouts, looked for in this order (SPEC sections 7 and 11):
- native: Clotho `clotho_captions_<split>.csv` + `<split>/` and `retrieval_audio/`; AudioCaps `<split>.csv` +
  `<split>/`, the CSV official or renamed; WavCaps (the folder aac-datasets calls `WavCaps/`: the Hugging Face
  cvssp/WavCaps `json_files/`, each source's flac files extracted into `Audio/<source>/`)
  `json_files/<source>/<short>_final.json` + `Audio/<source>/`.
- aac-datasets (the DCASE baseline's downloader; names as its
  `aac_datasets/datasets/functional/{clotho,audiocaps,wavcaps}.py` make them), raw_dir being its root: Clotho
  `CLOTHO_v2.1/clotho_csv_files/clotho_captions_<split>.csv` + `CLOTHO_v2.1/clotho_audio_files/<split>/` and
  `clotho_audio_files/test_retrieval_audio/`; AudioCaps `AUDIOCAPS/csv_files_v1/<split>.csv` (or
  `AUDIOCAPS/<split>.csv`, which aac-datasets reads first) + `AUDIOCAPS/audio_32000Hz/<split>/` (the only
  `audio_<rate>Hz/` when there is no 32 kHz one), official CSVs whose clips are named `{youtube_id}_{start_time}.flac`;
  WavCaps the native layout under `WavCaps/`.
- reference (the seed PyTorch system, Mei et al. 2022), raw_dir being `data/Clotho` or `data/AudioCaps`:
  `csv_files/{train,val,test}.csv` + `waveforms/{train,val,test}/` (Clotho's development, validation, evaluation).
A layout is present in a folder when one of its splits is (its CSV, or an audio-only split's folder); a folder where
none or several are present is an error naming what was looked for.
"""

import dataclasses
import glob
import os
from collections.abc import Callable, Iterable

from data_pipelines import clip_builder

CLOTHO_SPLITS = ("development", "validation", "evaluation")
RETRIEVAL_SPLIT = "retrieval"  # Clotho's DCASE retrieval audio: an audio-only split.
RETRIEVAL_AUDIO_DIR = "retrieval_audio"
AUDIOCAPS_SPLITS = ("train", "val", "test")
WAVCAPS_SPLIT = "train"  # WavCaps has one split, made of its four sources.
# WavCaps source -> its JSON (`{"data": [{"id", "caption", "duration", ...}, ...]}`) in `json_files/<source>/`.
WAVCAPS_JSONS = {
  "AudioSet_SL": "as_final.json",
  "BBC_Sound_Effects": "bbc_final.json",
  "FreeSound": "fsd_final.json",
  "SoundBible": "sb_final.json",
}
NATIVE, AAC_DATASETS, REFERENCE = "native", "aac-datasets", "reference"

# CSV schemas, named by the column that tells them apart. FILE_NAME: `file_name,caption_1..caption_5` (a clip a row)
# or `file_name,caption` (AudioCaps: a caption a row); OFFICIAL: `audiocap_id,youtube_id,start_time,caption`.
FILE_NAME, OFFICIAL = clip_builder.FILE_NAME_COLUMN, "youtube_id"
_SCHEMA_NAMES = {FILE_NAME: "renamed CSV", OFFICIAL: "official AudioCaps CSV"}

_AAC_CLOTHO_DIR = "CLOTHO_v2.1"
_AAC_AUDIOCAPS_DIR = "AUDIOCAPS"
_AAC_AUDIOCAPS_RATE_DIR = "audio_32000Hz"
_AAC_AUDIOCAPS_FILE_PATTERN = "{youtube_id}_{start_time}.flac"
_REFERENCE_SPLITS = ("train", "val", "test")
_AAC_WAVCAPS_DIR = "WavCaps"


@dataclasses.dataclass(frozen=True)
class SplitSource:
  """A split's caption CSV (None for an audio-only split: every audio file of `audio_dir`), the folder the CSV's file
  names are in, and the schemas the CSV may hold."""

  csv_path: str | None
  audio_dir: str
  schemas: tuple[str, ...] = ()

  @property
  def path(self) -> str:
    """What must exist for the split to be read: its CSV, else its audio folder."""
    return self.csv_path or self.audio_dir

  def present(self) -> bool:
    return os.path.isfile(self.path) if self.csv_path else os.path.isdir(self.path)

  def parts(self) -> dict[str, "SplitSource"]:
    return {"": self}


@dataclasses.dataclass(frozen=True)
class MultiSource:
  """A split read from several sources (a `SplitSource` each, by source name): present when one of them is."""

  sources: dict[str, SplitSource]

  @property
  def path(self) -> str:
    return ", ".join(source.path for source in self.sources.values())

  def present(self) -> bool:
    return any(source.present() for source in self.sources.values())

  def parts(self) -> dict[str, SplitSource]:
    return self.sources


@dataclasses.dataclass(frozen=True)
class Layout:
  """One layout of a dataset rooted at `raw_dir`: every split it defines, and `file_pattern`, how it names the audio
  of official AudioCaps CSVs (None: as config.data.audiocaps_file_pattern says)."""

  name: str
  raw_dir: str
  splits: dict[str, SplitSource | MultiSource]
  file_pattern: str | None = None

  def present_splits(self) -> dict[str, SplitSource | MultiSource]:
    return {split: source for split, source in self.splits.items() if source.present()}

  def present(self) -> bool:
    return bool(self.present_splits())

  def audio_path(self, split: str, file_name: str) -> str:
    """The audio file of the clip a prepared `split` names `file_name`: in the split's audio folder (a MultiSource
    split's file names are `<source>/<file>`: in that source's)."""
    source = self.splits[split]
    if isinstance(source, MultiSource):
      name, file_name = file_name.split("/", 1)
      source = source.sources[name]
    return os.path.join(source.audio_dir, file_name)

  def _relative(self, path: str) -> str:
    return os.path.relpath(path, self.raw_dir)

  def looked_for(self) -> str:
    paths = [self._relative(part.path) for source in self.splits.values() for part in source.parts().values()]
    return f"{self.name} ({', '.join(paths)})"

  def describe(self) -> str:
    """The layout and where each split present comes from, e.g. "aac-datasets layout: development =
    CLOTHO_v2.1/clotho_csv_files/clotho_captions_development.csv + CLOTHO_v2.1/clotho_audio_files/development/"."""
    sources = [
      f"{split}{f' ({name})' if name else ''} = "
      + " + ".join(([self._relative(s.csv_path)] if s.csv_path else []) + [self._relative(s.audio_dir) + "/"])
      for split, source in self.present_splits().items()
      for name, s in source.parts().items()
      if s.present()
    ]
    return f"{self.name} layout: {', '.join(sources)}"


def _sources(
  splits: Iterable[tuple[str, str]], csv_path: Callable[[str], str], audio_dir: Callable[[str], str], schemas
) -> dict[str, SplitSource]:
  """A SplitSource per (our split, the layout's name of it), its paths made from the layout's name."""
  return {ours: SplitSource(csv_path(theirs), audio_dir(theirs), schemas) for ours, theirs in splits}


def _clotho_layouts(raw_dir: str) -> list[Layout]:
  aac = os.path.join(raw_dir, _AAC_CLOTHO_DIR)
  same = list(zip(CLOTHO_SPLITS, CLOTHO_SPLITS))
  native = _sources(
    same,
    lambda split: os.path.join(raw_dir, f"clotho_captions_{split}.csv"),
    lambda split: os.path.join(raw_dir, split),
    (FILE_NAME,),
  )
  aac_datasets = _sources(
    same,
    lambda split: os.path.join(aac, "clotho_csv_files", f"clotho_captions_{split}.csv"),
    lambda split: os.path.join(aac, "clotho_audio_files", split),
    (FILE_NAME,),
  )
  return [
    Layout(NATIVE, raw_dir, native | {RETRIEVAL_SPLIT: SplitSource(None, os.path.join(raw_dir, RETRIEVAL_AUDIO_DIR))}),
    Layout(
      AAC_DATASETS,
      raw_dir,
      aac_datasets
      | {RETRIEVAL_SPLIT: SplitSource(None, os.path.join(aac, "clotho_audio_files", "test_retrieval_audio"))},
    ),
    Layout(REFERENCE, raw_dir, _reference_sources(raw_dir, zip(CLOTHO_SPLITS, _REFERENCE_SPLITS))),
  ]


def _reference_sources(raw_dir: str, splits: Iterable[tuple[str, str]]) -> dict[str, SplitSource]:
  return _sources(
    splits,
    lambda split: os.path.join(raw_dir, "csv_files", f"{split}.csv"),
    lambda split: os.path.join(raw_dir, "waveforms", split),
    (FILE_NAME,),
  )


def _aac_audiocaps_audio_dir(root: str) -> str:
  """`root/audio_32000Hz`, else the only `root/audio_<rate>Hz` folder; a ValueError when there are several."""
  preferred = os.path.join(root, _AAC_AUDIOCAPS_RATE_DIR)
  others = sorted(path for path in glob.glob(os.path.join(glob.escape(root), "audio_*Hz")) if os.path.isdir(path))
  if os.path.isdir(preferred) or not others:
    return preferred
  if len(others) > 1:
    raise ValueError(
      f"{root} holds several aac-datasets audio folders {[os.path.basename(p) for p in others]} and no "
      f"{_AAC_AUDIOCAPS_RATE_DIR}: keep the one to read"
    )
  return others[0]


def _aac_audiocaps_csv(root: str, split: str) -> str:
  """aac-datasets (v1) reads `AUDIOCAPS/<split>.csv` when it exists, else `AUDIOCAPS/csv_files_v1/<split>.csv`."""
  legacy = os.path.join(root, f"{split}.csv")
  return legacy if os.path.isfile(legacy) else os.path.join(root, "csv_files_v1", f"{split}.csv")


def _audiocaps_layouts(raw_dir: str) -> list[Layout]:
  aac = os.path.join(raw_dir, _AAC_AUDIOCAPS_DIR)
  aac_audio = _aac_audiocaps_audio_dir(aac)
  same = list(zip(AUDIOCAPS_SPLITS, AUDIOCAPS_SPLITS))
  native = _sources(
    same,
    lambda split: os.path.join(raw_dir, f"{split}.csv"),
    lambda split: os.path.join(raw_dir, split),
    (OFFICIAL, FILE_NAME),
  )
  aac_datasets = _sources(
    same, lambda split: _aac_audiocaps_csv(aac, split), lambda split: os.path.join(aac_audio, split), (OFFICIAL,)
  )
  return [
    Layout(NATIVE, raw_dir, native),
    Layout(AAC_DATASETS, raw_dir, aac_datasets, file_pattern=_AAC_AUDIOCAPS_FILE_PATTERN),
    Layout(REFERENCE, raw_dir, _reference_sources(raw_dir, zip(AUDIOCAPS_SPLITS, _REFERENCE_SPLITS))),
  ]


def _wavcaps_split(root: str) -> dict[str, MultiSource]:
  sources = {
    source: SplitSource(os.path.join(root, "json_files", source, json_name), os.path.join(root, "Audio", source))
    for source, json_name in WAVCAPS_JSONS.items()
  }
  return {WAVCAPS_SPLIT: MultiSource(sources)}


def wavcaps_file_name(source: str, clip_id: str) -> str:
  """The audio file name of a WavCaps JSON entry's id: `<id>.flac` (AudioSet_SL's ids end in `.wav`, made `.flac`)."""
  return clip_id.replace(".wav", ".flac") if source == "AudioSet_SL" else f"{clip_id}.flac"


def candidates(dataset: str, raw_dir: str) -> list[Layout]:
  """Every layout of `dataset` rooted at `raw_dir`, in the order they are looked for (native first)."""
  if dataset == "clotho":
    return _clotho_layouts(raw_dir)
  if dataset == "audiocaps":
    return _audiocaps_layouts(raw_dir)
  if dataset == "wavcaps":
    return [
      Layout(NATIVE, raw_dir, _wavcaps_split(raw_dir)),
      Layout(AAC_DATASETS, raw_dir, _wavcaps_split(os.path.join(raw_dir, _AAC_WAVCAPS_DIR))),
    ]
  raise ValueError(f"dataset {dataset!r} has no raw folder layouts")


def looked_for(dataset: str, raw_dir: str) -> str:
  """What `detect` looks for in `raw_dir`, layout by layout (paths relative to raw_dir)."""
  return "; ".join(layout.looked_for() for layout in candidates(dataset, raw_dir))


def find(dataset: str, raw_dir: str) -> Layout:
  """The layout `raw_dir` is in; the native one when it is in none (where a split's files go); a ValueError when it is
  in several."""
  layouts = candidates(dataset, raw_dir)
  present = [layout for layout in layouts if layout.present()]
  if len(present) > 1:
    raise ValueError(
      f"{raw_dir} holds files of several {dataset} layouts: "
      + "; ".join(f"{layout.name} ({', '.join(layout.present_splits())})" for layout in present)
      + ". Keep one, or point the raw folder at a folder holding one"
    )
  return present[0] if present else layouts[0]


def detect(dataset: str, raw_dir: str) -> Layout:
  """The layout `raw_dir` is in: a FileNotFoundError naming every file looked for when it is in none, a ValueError
  when it is in several."""
  layout = find(dataset, raw_dir)
  if not layout.present():
    raise FileNotFoundError(f"{raw_dir} is in no {dataset} layout: looked for {looked_for(dataset, raw_dir)}")
  return layout


def schema(table: clip_builder.CsvTable, source: SplitSource) -> str:
  """The first of `source.schemas` whose distinguishing column is in `table`; a ValueError naming them otherwise."""
  for name in source.schemas:
    if name in table.header:
      return name
  wanted = " or ".join(f"{name!r} ({_SCHEMA_NAMES[name]})" for name in source.schemas)
  raise ValueError(f"{table.path}: required column {wanted} is missing (header: {table.header})")
