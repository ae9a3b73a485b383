"""Command line: turns a raw dataset folder into TFRecords of log-mel or waveform clips once, then prints what was read,
written and skipped, and where the report is.

  python -m data_pipelines.prepare --dataset {clotho,audiocaps,wavcaps} --raw_dir RAW [--out_dir OUT]
      [--audio_feature {log_mel,waveform}] [--audiocaps_file_pattern '{youtube_id}.wav']
      [--wavcaps_exclude_csv IDS.csv] [--workers N]
      [--runner {multiprocessing,beam} [--beam_pipeline_options "runner=DirectRunner,direct_num_workers=2,..."]]

RAW is the dataset's raw folder in any of its layouts (`layouts`: native, the root of an aac-datasets download, the
reference's data/<Dataset>), detected and printed. `--audio_feature` is what the records hold (`audio_forms`: the
float16 64-band log-mel of CNN14 and ResNet38, or the int16 32 kHz waveform of PaSST; config.data.audio_feature). OUT
defaults to `datasets.default_data_dir(DATASET, RAW, AUDIO_FEATURE)`, a folder per form and content of RAW's caption
CSVs (not per path: RAW moved elsewhere finds it, and re-laid out is prepared again from the feature cache). The
default folders of a dataset and form share one feature cache, ~/.cache/atr_jax/prepared/feature_cache/DATASET (with
`-waveform` for the waveform), so edited caption CSVs, which get a default folder of their own, decode only new and
modified audio; an OUT given has its cache beside it. A killed run continues where it stopped when started again;
running it on a prepared OUT prepares again if the sources changed since (decoding only new and modified audio), else
only prints the counts.

`--runner beam` decodes the clips on Apache Beam (`beam_generation`: needs `pip install atr-jax[beam]`; the same
records, report and resumability; RAW and OUT must be on a filesystem every Beam worker mounts at the same path).
"""

import os

from absl import app, flags

from data_pipelines import audio_forms, audiocaps, clip_builder, datasets, extraction, layouts

_DATASET = flags.DEFINE_enum("dataset", "clotho", list(datasets.DATASETS), "Dataset in raw_dir.")
_RAW_DIR = flags.DEFINE_string(
  "raw_dir",
  None,
  "Raw dataset folder (caption CSVs and audio folders, in any layout: see docs/data.md).",
  required=True,
)
_AUDIO_FEATURE = flags.DEFINE_enum(
  "audio_feature",
  "log_mel",
  list(audio_forms.AUDIO_FORMS),
  "What the records hold per clip: the float16 64-band log-mel (CNN14, ResNet38) or the int16 32 kHz waveform "
  "(PaSST); as config.data.audio_feature.",
)
_OUT_DIR = flags.DEFINE_string(
  "out_dir",
  None,
  "Where the TFRecords go, the feature cache beside them (default: a folder per audio_feature and content of "
  "raw_dir's caption CSVs under ~/.cache/atr_jax/prepared, whose feature_cache/ they share).",
)
_FILE_PATTERN = flags.DEFINE_string(
  "audiocaps_file_pattern",
  audiocaps.DEFAULT_FILE_PATTERN,
  "AudioCaps official CSVs: audio file name made of {youtube_id}, {start_time} and {audiocap_id} (the default "
  "stands for the layout's naming: aac-datasets names its files '{youtube_id}_{start_time}.flac').",
)
_EXCLUDE_CSV = flags.DEFINE_string(
  "wavcaps_exclude_csv",
  "",
  "WavCaps: a CSV whose column 'id' lists the Freesound ids kept out of training (Clotho's evaluation clips).",
)
_WORKERS = flags.DEFINE_integer(
  "workers",
  None,
  "Feature-extraction processes (default: one per CPU core); with --runner beam and no runner= option, the "
  "DirectRunner's workers.",
  lower_bound=1,
)
_RUNNER = flags.DEFINE_enum(
  "runner",
  "multiprocessing",
  ["multiprocessing", "beam"],
  "Who decodes the clips: this machine's worker processes, or an Apache Beam pipeline (pip install atr-jax[beam]).",
)
_BEAM_OPTIONS = flags.DEFINE_string(
  "beam_pipeline_options",
  "",
  "With --runner beam: Beam pipeline options as comma-separated name=value pairs, e.g. "
  "'runner=DataflowRunner,project=P,region=R,temp_location=gs://B/tmp,setup_file=./pyproject.toml'; repeat a name "
  "for a list option (experiments=a,experiments=b). Default: the DirectRunner with --workers threads.",
)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  beam_options = None
  if _RUNNER.value == "beam":
    try:
      beam_generation = clip_builder.import_beam_generation()
    except ImportError as e:
      raise app.UsageError(f"--runner beam: {e}") from None
    beam_options = _BEAM_OPTIONS.value
    try:
      beam_generation.parse_options(beam_options, _WORKERS.value)  # A bad option fails before any work.
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  elif _BEAM_OPTIONS.value:
    raise app.UsageError("--beam_pipeline_options needs --runner beam")
  raw_dir = os.path.expanduser(_RAW_DIR.value)
  try:
    out_dir = _OUT_DIR.value or datasets.default_data_dir(_DATASET.value, raw_dir, _AUDIO_FEATURE.value)
  except FileNotFoundError as e:
    raise app.UsageError(f"--raw_dir: {e}") from None
  builder = datasets.prepare(
    _DATASET.value,
    raw_dir,
    out_dir,
    audiocaps_file_pattern=_FILE_PATTERN.value,
    wavcaps_exclude_csv=_EXCLUDE_CSV.value,
    workers=_WORKERS.value,
    beam_options=beam_options,
    audio_feature=_AUDIO_FEATURE.value,
  )
  counts = builder.info.metadata["preparation"]
  print(f"{_DATASET.value} prepared in {builder.data_path}")
  if os.path.isdir(raw_dir):
    print(f"  from {raw_dir}, {layouts.detect(_DATASET.value, raw_dir).describe()}")
  for split in builder.info.splits:
    print(f"  {split}: {builder.info.splits[split].num_examples} clips, {counts[split]['captions_written']} captions")
  print(extraction.format_summary(_DATASET.value, counts))
  print(f"report of every skipped clip and caption and every note: {clip_builder.report_path(builder)}")


if __name__ == "__main__":
  app.run(main)
