"""Resolves `config.data` to prepared TFDS builders: the main dataset (`config.data.dataset` in raw_dir; the
synthetic Clotho-layout dataset is generated first when asked) and the extra training sources of
`config.data.extra_train`, all in the audio form `config.data.audio_feature` (each form in its own folder). Each is
prepared on first use, and again when its sources changed, by process 0 while
the other processes wait. A dataset without a data_dir of its own goes to its default folder (`default_data_dir`),
named after the content of its caption CSVs, so that a raw folder moved elsewhere finds what was prepared from it;
the default folders of one dataset and audio form share one feature cache (`clip_builder`), so that the folder of an
edited caption CSV decodes only new and changed audio."""

import os

import ml_collections
from absl import logging

from data_pipelines import audio_forms, audiocaps, clip_builder, clotho, synthetic, wavcaps

BUILDERS = {"clotho": clotho.Clotho, "audiocaps": audiocaps.AudioCaps, "wavcaps": wavcaps.WavCaps}
DATASETS = tuple(BUILDERS)


def prepare(
  dataset: str,
  raw_dir: str,
  data_dir: str,
  *,
  audiocaps_file_pattern: str = audiocaps.DEFAULT_FILE_PATTERN,
  wavcaps_exclude_csv: str = "",
  workers: int | None = None,
  beam_options: str | None = None,
  check_sources: bool = True,
  audio_feature: str = "log_mel",
) -> clip_builder.CaptionedClips:
  """The builder of `dataset` (one of DATASETS) in `data_dir`, prepared from `raw_dir` unless complete and up to date
  (`clip_builder.prepare`), its records holding the audio form `audio_feature`: its clips extracted by `workers`
  processes, or by a Beam pipeline when `beam_options` (`beam_generation.parse_options`) is not None."""
  common = dict(workers=workers, beam_options=beam_options, check_sources=check_sources, audio_feature=audio_feature)
  if dataset == "clotho":
    return clotho.prepare(raw_dir, data_dir, **common)
  if dataset == "audiocaps":
    return audiocaps.prepare(raw_dir, data_dir, file_pattern=audiocaps_file_pattern, **common)
  if dataset == "wavcaps":
    return wavcaps.prepare(raw_dir, data_dir, exclude_csv=wavcaps_exclude_csv, **common)
  raise ValueError(f"dataset {dataset!r} is not supported (supported: {DATASETS})")


def _form_suffix(folder_name: str) -> str:
  """The audio form a default folder's name ends with ("" for the log-mel's, which has none)."""
  last = folder_name.rpartition("-")[2]
  return last if last in audio_forms.AUDIO_FORMS else ""


def default_data_dir(dataset: str, raw_dir: str, audio_feature: str) -> str:
  """The default data dir of `dataset` in `raw_dir` for `audio_feature` (`CaptionedClips.default_data_dir`: named
  after the content of its caption CSVs, not the folder's path). When it is new, the other prepared folders of the
  dataset and form beside it are logged: those of other caption CSVs (the new folder is prepared from the feature
  cache they share, `CaptionedClips.shared_feature_cache_dir`), and those earlier versions named after a raw folder's
  path (their feature caches are their own: whatever they hold is decoded again)."""
  data_dir = BUILDERS[dataset].default_data_dir(raw_dir, audio_feature)
  root, name = os.path.split(data_dir)
  if not os.path.isdir(data_dir) and os.path.isdir(root):
    others = sorted(
      entry.path
      for entry in os.scandir(root)
      if entry.name != clip_builder.SHARED_CACHE_FOLDER
      and os.path.isdir(os.path.join(entry.path, BUILDERS[dataset].name))
      and _form_suffix(entry.name) == _form_suffix(name)
    )
    if others:
      logging.warning(
        "%s: %s is prepared into a new default folder, %s (named after its caption CSVs' content); these prepared %s "
        "folders are not used for it (other caption CSVs, or named after a raw folder's path by an earlier version): "
        "delete those no longer needed (the feature-cache entries only they use go at the next preparation): %s",
        dataset,
        raw_dir,
        data_dir,
        dataset,
        others,
      )
  return data_dir


def raw_and_data_dirs(data_config: ml_collections.ConfigDict) -> tuple[str, str]:
  """The raw folder of `data_config` and its data_dir ("" for the default one: `default_data_dir`, which needs the
  raw folder, maybe generated first)."""
  if not data_config.raw_dir:
    raise ValueError(
      f"config.data.raw_dir is empty: set it to a {data_config.dataset} raw folder, in any of its layouts "
      "(see docs/data.md)"
    )
  if data_config.dataset not in DATASETS:
    raise ValueError(f"config.data.dataset={data_config.dataset!r} is not supported (supported: {DATASETS})")
  raw_dir = os.path.abspath(os.path.expanduser(data_config.raw_dir))
  return raw_dir, os.path.expanduser(data_config.data_dir)


def _ensure_raw(raw_dir: str, data_config: ml_collections.ConfigDict) -> None:
  if os.path.isdir(raw_dir):
    return
  if not data_config.generate_synthetic:
    raise FileNotFoundError(f"config.data.raw_dir={raw_dir!r} does not exist")
  if data_config.dataset != "clotho":
    raise ValueError(
      "config.data.generate_synthetic makes a Clotho-layout dataset: it needs "
      f"config.data.dataset='clotho', not {data_config.dataset!r}"
    )
  logging.info("Generating the synthetic dataset into %s", raw_dir)
  generate_synthetic(raw_dir, data_config.synthetic)


def generate_synthetic(raw_dir: str, spec: ml_collections.ConfigDict, duration_s: float | None = None) -> None:
  """Our synthetic Clotho-layout set of `spec` (`config.data.synthetic`) in `raw_dir`, its clips `duration_s` long
  (default `spec.duration_s`)."""
  synthetic.generate(
    raw_dir,
    {"development": spec.num_development, "validation": spec.num_validation, "evaluation": spec.num_evaluation},
    seed=spec.seed,
    duration_s=spec.duration_s if duration_s is None else duration_s,
  )


def _prepare_on_process_zero(
  dataset: str, raw_dir: str, data_dir: str, data_config: ml_collections.ConfigDict, make_raw=None
) -> clip_builder.CaptionedClips:
  """Process 0 prepares (after `make_raw()`; again when the sources changed), the others wait at a barrier, then open
  what process 0 prepared without comparing its sources again (they might see a later change, and prepare too).
  `data_dir` "" is the default one (`default_data_dir`, found once the raw folder is made)."""
  import jax
  from jax.experimental import multihost_utils

  def prepare_it(**kwargs) -> clip_builder.CaptionedClips:
    return prepare(
      dataset,
      raw_dir,
      data_dir or default_data_dir(dataset, raw_dir, data_config.audio_feature),
      audiocaps_file_pattern=data_config.audiocaps_file_pattern,
      wavcaps_exclude_csv=data_config.wavcaps_exclude_csv,
      audio_feature=data_config.audio_feature,
      **kwargs,
    )

  if jax.process_index() == 0:
    if make_raw is not None:
      make_raw()
    builder = prepare_it()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"atr_jax_prepare_data {dataset} {raw_dir} {data_dir}")
  return builder if jax.process_index() == 0 else prepare_it(check_sources=False)


def prepare_builder(data_config: ml_collections.ConfigDict) -> clip_builder.CaptionedClips:
  """The prepared builder of the main dataset of `data_config`, made on first use. Safe to call from every process
  of a job that shares a filesystem: process 0 does the work while the others wait at a barrier."""
  raw_dir, data_dir = raw_and_data_dirs(data_config)
  return _prepare_on_process_zero(
    data_config.dataset, raw_dir, data_dir, data_config, make_raw=lambda: _ensure_raw(raw_dir, data_config)
  )


def parse_extra_train(extra_train: str) -> list[tuple[str, str, str]]:
  """(dataset, raw_dir, split) per comma-separated "dataset:raw_dir:split" entry of config.data.extra_train."""
  entries = []
  for entry in (e.strip() for e in extra_train.split(",")):
    if not entry:
      continue
    dataset, _, rest = entry.partition(":")
    raw_dir, _, split = rest.rpartition(":")
    if dataset not in DATASETS or not raw_dir or not split:
      raise ValueError(
        f"config.data.extra_train entry {entry!r} is not 'dataset:raw_dir:split' with dataset one of {DATASETS}"
      )
    entries.append((dataset, os.path.abspath(os.path.expanduser(raw_dir)), split))
  return entries


def _check_split(builder: clip_builder.CaptionedClips, split: str, where: str) -> None:
  if split not in builder.info.splits:
    raise ValueError(f"{where}: split {split!r} is not in {builder.data_path} (it has {list(builder.info.splits)})")


def train_sources(data_config: ml_collections.ConfigDict) -> list[tuple[clip_builder.CaptionedClips, str]]:
  """(builder, split) of every training source: the main dataset's config.data.train_split first, then one per
  config.data.extra_train entry (each prepared into its default data dir for config.data.audio_feature,
  `default_data_dir`)."""
  extras = parse_extra_train(data_config.extra_train)  # Malformed entries fail before any preparation.
  main = prepare_builder(data_config)
  _check_split(main, data_config.train_split, "config.data.train_split")
  sources = [(main, data_config.train_split)]
  for dataset, raw_dir, split in extras:
    if not os.path.isdir(raw_dir):
      raise FileNotFoundError(f"config.data.extra_train: raw_dir {raw_dir!r} does not exist")
    builder = _prepare_on_process_zero(dataset, raw_dir, "", data_config)
    _check_split(builder, split, f"config.data.extra_train entry {dataset}:{raw_dir}:{split}")
    sources.append((builder, split))
  return sources
