"""What a restarted run checks before it continues the run in its workdir, and where it continues: the config keys
that fix the data order and the step count (RESUME_KEYS, against the workdir's config.json), the fingerprint of the
prepared training data (saved with each checkpoint, `checkpointing.save`), and the epoch and batch a global step
falls in."""

import hashlib
import json
import os

import ml_collections
from absl import logging

from atr_jax import checkpointing
from atr_jax.train_state import make_schedule
from data_pipelines import clip_builder, input_pipeline

# The keys that fix the training data's order and the step count: a run resumed with another value of one of
# them would not continue the run it resumes.
RESUME_KEYS = (
  "seed",
  "data.dataset",
  "data.raw_dir",
  "data.data_dir",
  "data.extra_train",
  "data.audiocaps_file_pattern",
  "data.wavcaps_exclude_csv",
  "data.train_split",
  "data.train_max_frames",
  "data.extra_train_max_frames",
  "data.shuffle_buffer",
  "data.num_input_shards",
  "train.global_batch_size",
  "train.num_epochs",
)
_PATH_KEYS = ("data.raw_dir", "data.data_dir", "data.wavcaps_exclude_csv")  # Compared as absolute paths.
_ABSENT = object()  # A key the saved config.json does not hold (written before the key existed).


def changed_config_keys(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """'key: saved -> new' for each of RESUME_KEYS that differs from the config saved in `workdir` when it holds a
  checkpoint to resume; [] otherwise."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  checkpoints = os.path.join(workdir, "checkpoints")
  config_path = os.path.join(workdir, checkpointing.CONFIG_FILE)
  if not (
    os.path.isfile(config_path)
    and os.path.isdir(checkpoints)
    and any(name.isdigit() for name in os.listdir(checkpoints))
  ):
    return []
  with open(config_path) as f:
    saved = json.load(f)
  new = json.loads(config.to_json_best_effort())  # The same normalisation (tuples -> lists) as the saved file.
  changed = []
  for key in RESUME_KEYS:
    values = []
    for tree in (saved, new):
      for part in key.split("."):
        tree = tree.get(part, _ABSENT) if isinstance(tree, dict) else _ABSENT
      values.append(
        os.path.abspath(os.path.expanduser(tree)) if key in _PATH_KEYS and tree and tree is not _ABSENT else tree
      )
    if values[0] is _ABSENT:  # A key newer than the saved run (written before the key existed): not compared.
      continue
    if values[0] != values[1]:
      changed.append(f"{key}: {values[0]!r} -> {values[1]!r}")
  return changed


def _sha1(data: bytes) -> str:
  return hashlib.sha1(data).hexdigest()


def data_fingerprint(sources, steps_per_epoch: int) -> dict:
  """The fingerprint of the prepared training data (the (builder, split) `sources`) saved with each checkpoint: per
  source, its dataset, split, folder, clip and caption counts, the sha1 of the sources fingerprint its preparation
  stored (`clip_builder.SOURCES_FILE`: every caption CSV and audio file it was prepared from) and the sha1 of the
  split's clip table (`clip_builder.CLIPS_FILE`: file names, captions, stored lengths); and the steps per epoch."""
  entries = []
  for builder, split in sources:
    with open(os.path.join(builder.data_dir, clip_builder.SOURCES_FILE), "rb") as f:
      sources_sha1 = _sha1(f.read())
    with open(os.path.join(builder.data_dir, clip_builder.CLIPS_FILE), encoding="utf-8") as f:
      table = json.load(f)[split]
    entries.append(
      {
        "dataset": builder.name,
        "split": split,
        "data_dir": os.fspath(builder.data_dir),
        "clips": input_pipeline.num_clips(builder, split),
        "captions": input_pipeline.train_pairs_per_epoch(builder, split),
        "sources_sha1": sources_sha1,
        "split_sha1": _sha1(json.dumps(table, sort_keys=True, ensure_ascii=False).encode("utf-8")),
      }
    )
  return {"sources": entries, "steps_per_epoch": steps_per_epoch}


def _describe_source(saved: dict | None, current: dict | None) -> str:
  """What differs between one source's saved and current fingerprint entry ("" when nothing does)."""
  entry = current or saved
  name = f"{entry['dataset']} {entry['split']} ({entry['data_dir']})"
  if saved is None or current is None:
    return f"{name}: {'added' if saved is None else 'removed'}"
  if (saved["dataset"], saved["split"]) != (current["dataset"], current["split"]):
    return f"{saved['dataset']} {saved['split']} ({saved['data_dir']}) replaced by {name}"
  counts = [
    f"{saved[key]} -> {current[key]} {key}" if saved[key] != current[key] else f"{current[key]} {key}"
    for key in ("clips", "captions")
  ]
  if saved["split_sha1"] != current["split_sha1"]:
    return f"{name}: its clips, captions or clip lengths changed ({', '.join(counts)})"
  if saved["sources_sha1"] != current["sources_sha1"]:
    return (
      f"{name}: prepared again from changed sources (another split's CSV or an audio file); its clips, captions "
      f"and clip lengths are the same ({', '.join(counts)})"
    )
  return ""


def data_changes(saved: dict, current: dict) -> list[str]:
  """What differs between a checkpoint's saved `data_fingerprint` and the current one, a line per changed source
  and one for the steps per epoch ([] when the training data is the same)."""
  saved_sources, current_sources = saved["sources"], current["sources"]
  count = max(len(saved_sources), len(current_sources))
  pad = [None] * count
  changes = [
    change
    for old, new in zip((saved_sources + pad)[:count], (current_sources + pad)[:count])
    if (change := _describe_source(old, new))
  ]
  if changes and saved["steps_per_epoch"] != current["steps_per_epoch"]:
    changes.append(f"steps per epoch: {saved['steps_per_epoch']} -> {current['steps_per_epoch']}")
  return changes


def position(step: int, steps_per_epoch: int) -> tuple[int, int]:
  """(epoch, batch within it), both from 0, at which training continues after global step `step`."""
  return step // steps_per_epoch, step % steps_per_epoch


def bookkeeping(
  step: int, saved_steps_per_epoch: int, steps_per_epoch: int, num_epochs: int, learning_rates: tuple[float, float]
) -> str:
  """How a run resumed at global `step` continues on data of `steps_per_epoch` steps an epoch instead of
  `saved_steps_per_epoch`; `learning_rates` is the schedule's learning rate of the next step before and after."""
  saved_epoch, saved_batch = position(step, saved_steps_per_epoch)
  epoch, batch = position(step, steps_per_epoch)
  total = steps_per_epoch * num_epochs
  text = (
    f"the global step {step} is kept (the optimizer's step count, the random streams and the learning-rate schedule "
    f"go on from it). At {saved_steps_per_epoch} steps an epoch the run continued with batch {saved_batch} of epoch "
    f"{saved_epoch + 1}; at {steps_per_epoch} it continues with batch {batch} of epoch {epoch + 1} (the first {batch} "
    f"batches of that epoch's order of the new data are skipped). The learning-rate schedule is rebuilt for "
    f"{steps_per_epoch} steps an epoch ({total} steps in all, was {saved_steps_per_epoch * num_epochs}): step "
    f"{step + 1} learns at {learning_rates[1]:.4g} (was {learning_rates[0]:.4g})"
  )
  if step >= total:
    text += f"; step {step} is past the last step of the new schedule ({total}): the best checkpoint is only tested"
  return text


def check_data(manager, step: int, current: dict, config: ml_collections.ConfigDict, *, allow_data_change: bool):
  """Compares the data fingerprint saved with the checkpoint of `step` with `current` (`data_fingerprint`): a
  `checkpointing.CheckpointError` naming what changed unless `allow_data_change`. A run that goes on with another
  number of steps an epoch (changed data, or a changed global batch with --allow_config_change) logs how it
  continues (`bookkeeping`). A checkpoint saved without a fingerprint (an older version) is resumed with
  a warning."""
  saved = checkpointing.saved_data_fingerprint(manager, step)
  if saved is None:
    logging.warning("The checkpoint of step %d holds no data fingerprint (an older version): data unchecked", step)
    return
  changes = data_changes(saved, current)
  if changes and not allow_data_change:
    raise checkpointing.CheckpointError(
      f"the training data changed since the checkpoint of step {step} in {manager.directory} was saved "
      f"({'; '.join(changes)}); resuming on it would shift the epoch, the batches skipped and the learning-rate "
      "schedule. Restore the data, train into a new --workdir, or pass --allow_data_change to resume on the new data."
    )
  old, new = saved["steps_per_epoch"], current["steps_per_epoch"]
  if changes or old != new:
    num_epochs = config.train.num_epochs
    learning_rates = tuple(
      float(make_schedule(config.optim, config.optim.learning_rate, spe, num_epochs)(step)) for spe in (old, new)
    )
    logging.warning(
      "Resuming %s. So %s",
      f"on changed training data (--allow_data_change): {'; '.join(changes)}"
      if changes
      else f"with {old} -> {new} steps an epoch (--allow_config_change)",
      bookkeeping(step, old, new, num_epochs, learning_rates),
    )
