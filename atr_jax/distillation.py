"""Ensemble distillation's teacher folders (SPEC 11): writing a trained model's embeddings of every training clip and
caption once, and looking them up for the training batches by (clip, caption) identity.

A teacher folder (`python -m atr_jax.retrieve embed-train --workdir T --out T/teacher`, written atomically) holds
- `audio.npy` float32 [clips, D]: unit rows, one per training clip embedded whole (as evaluation embeds clips);
- `text.npy` float32 [captions, D]: unit rows, one per training caption;
- `keys.json`: per training source {dataset, split, file_names, captions (per clip)}: the clips in row order, and
  the captions of each clip in row order (caption rows follow the clips' order);
- `manifest.json`: the model that made it (`model_identity.ModelIdentity.record()`: workdir, checkpoint step, model
  config fingerprint and the config it hashes), embed_dim and the counts.
A folder is checked against its workdir's best checkpoint when that workdir is here: a folder made at another step
or with another model config is an error naming both and the embed-train command that rebuilds it (a warning when
the workdir is gone or the folder predates fingerprints: it cannot be checked).
A clip is identified by (dataset, file name), a caption by (its clip, its index among the clip's captions) and its
text must match. The training batches carry each pair's clip_id and caption_index; `Teachers.add_to` (on each host,
for its own rows) turns them into the pairs' teacher embeddings, so the lookup does not depend on the data order,
the number of hosts or a resume.
"""

import json
import os
from typing import NamedTuple

import numpy as np
from absl import logging

from atr_jax import checkpointing, model_identity
from atr_jax.atomic_files import write_folder_atomically
from data_pipelines import input_pipeline

AUDIO_FILE, TEXT_FILE, KEYS_FILE, MANIFEST_FILE = "audio.npy", "text.npy", "keys.json", "manifest.json"
AUDIO_KEY, TEXT_KEY = "teacher_audio", "teacher_text"  # Batch arrays (b, K, D): the K teachers' embeddings.
_SHOWN = 10  # Missing clips named in an error.


class SourceKeys(NamedTuple):
  """The identities of one training source's clips and captions, by clip id."""

  dataset: str
  split: str
  file_names: list
  captions: list  # [[caption, ...] per clip]


def source_keys(builder, split: str) -> SourceKeys:
  captions, clip_ids, file_names = input_pipeline.eval_captions(builder, split)
  per_clip = [[] for _ in file_names]
  for caption, clip_id in zip(captions, clip_ids):
    per_clip[clip_id].append(caption)
  return SourceKeys(builder.name, split, list(file_names), per_clip)


def teacher_folders(distill_config) -> list:
  """config.distill.teachers as a list of folders (a comma-separated string or a sequence; empty: no distillation)."""
  teachers = distill_config.teachers
  entries = teachers.split(",") if isinstance(teachers, str) else list(teachers)
  return [os.path.abspath(os.path.expanduser(entry.strip())) for entry in entries if entry.strip()]


def write_teacher(folder: str, keys: list, audio: list, text: list, manifest: dict) -> None:
  """Writes a teacher folder: per source, its `SourceKeys`, its clip embeddings [clips, D] (row = clip id) and its
  caption embeddings [captions, D] (clips' captions in clip-id order); rows are L2-normalised here."""

  def unit(arrays):
    x = np.concatenate(arrays).astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

  audio, text = unit(audio), unit(text)
  sources = [
    {"dataset": k.dataset, "split": k.split, "clips": len(k.file_names), "captions": sum(map(len, k.captions))}
    for k in keys
  ]
  manifest = {**manifest, "embed_dim": audio.shape[1], "clips": len(audio), "captions": len(text), "sources": sources}

  def write(partial: str) -> None:
    np.save(os.path.join(partial, AUDIO_FILE), audio)
    np.save(os.path.join(partial, TEXT_FILE), text)
    with open(os.path.join(partial, KEYS_FILE), "w", encoding="utf-8") as f:
      json.dump({"sources": [k._asdict() for k in keys]}, f)
    with open(os.path.join(partial, MANIFEST_FILE), "w", encoding="utf-8") as f:
      json.dump(manifest, f, indent=2)

  write_folder_atomically(folder, write)


def check_teacher(folder: str) -> None:
  """A `model_identity.ModelMismatch` naming both models and the command that rebuilds the teacher folder unless it
  was made by the best checkpoint of the workdir its manifest names; a warning when that workdir is not here."""
  with open(os.path.join(folder, MANIFEST_FILE), encoding="utf-8") as f:
    recorded = json.load(f)
  workdir = recorded.get("workdir", "")
  if not (workdir and os.path.isfile(os.path.join(workdir, checkpointing.CONFIG_FILE))):
    logging.warning(
      "config.distill.teachers: the run that made %s (%r) is not here, so the folder cannot be checked against it",
      folder,
      workdir,
    )
    return
  rebuild = ["python", "-m", "atr_jax.retrieve", "embed-train", f"--workdir={workdir}", f"--out={folder}"]
  model_identity.check(recorded, model_identity.of_workdir(workdir), f"the teacher folder {folder}", rebuild)


def _rows_of(folder: str, training: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(audio [clips, D], text [captions, D] (memory-mapped), row of each training clip, text row of each training
  clip's first caption), training clips numbered over `training`'s sources in order (the pipeline's clip ids); a
  ValueError naming the folder and what it lacks when it does not cover `training`."""
  paths = [os.path.join(folder, name) for name in (AUDIO_FILE, TEXT_FILE, KEYS_FILE, MANIFEST_FILE)]
  if not all(os.path.isfile(path) for path in paths):
    raise FileNotFoundError(
      f"config.distill.teachers: {folder} is not a teacher folder (needs {AUDIO_FILE}, {TEXT_FILE}, {KEYS_FILE} and "
      f"{MANIFEST_FILE}); write one with `python -m atr_jax.retrieve embed-train --workdir RUN --out {folder}`"
    )
  check_teacher(folder)
  audio, text = (np.load(path, mmap_mode="r") for path in paths[:2])
  with open(paths[2], encoding="utf-8") as f:
    sources = [SourceKeys(**source) for source in json.load(f)["sources"]]
  index, clip_row, caption_row = {}, 0, 0
  for source in sources:
    for name, captions in zip(source.file_names, source.captions):
      index[(source.dataset, name)] = (clip_row, caption_row, captions)
      clip_row, caption_row = clip_row + 1, caption_row + len(captions)
  if (clip_row, caption_row) != (len(audio), len(text)) or audio.shape[1:] != text.shape[1:]:
    raise ValueError(
      f"{folder}: {KEYS_FILE} lists {clip_row} clips and {caption_row} captions, the embeddings are {audio.shape} "
      f"and {text.shape}: write the folder again"
    )
  clip_rows, caption_rows, missing, changed, total = [], [], [], [], 0
  for source in training:
    for name, captions in zip(source.file_names, source.captions):
      found = index.get((source.dataset, name))
      if found is None:
        missing.append(f"{source.dataset}:{name}")
      elif list(found[2]) != list(captions):
        changed.append(f"{source.dataset}:{name}")
      clip_rows.append(found[0] if found else -1)
      caption_rows.append(found[1] if found else -1)
    total += len(source.file_names)
  for problem, names in (("are missing from", missing), ("have other captions in", changed)):
    if names:
      raise ValueError(
        f"config.distill.teachers: {len(names)} of the {total} training clips {problem} the teacher folder {folder} "
        f"(e.g. {names[:_SHOWN]}): embed this training set with `python -m atr_jax.retrieve embed-train`"
      )
  return audio, text, np.asarray(clip_rows, np.int64), np.asarray(caption_rows, np.int64)


class Teachers:
  """The teacher folders of config.distill.teachers, checked against the training sources [(builder, split)]."""

  def __init__(self, folders: list, training: list):
    if not folders:
      raise ValueError("config.distill.teachers is empty")
    self.folders = folders
    self._tables = [_rows_of(folder, training) for folder in folders]
    self.width = max(audio.shape[1] for audio, *_ in self._tables)

  @classmethod
  def from_config(cls, distill_config, sources) -> "Teachers | None":
    folders = teacher_folders(distill_config)
    if folders and not distill_config.weight > 0:
      raise ValueError(f"config.distill.teachers is set but config.distill.weight={distill_config.weight} is not > 0")
    return cls(folders, [source_keys(builder, split) for builder, split in sources]) if folders else None

  def lookup(self, clip_ids: np.ndarray, caption_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(audio, text) float32 (b, K, width): the K teachers' embeddings of pairs (clip_ids, caption_index) (ids over
    the training sources, as the pipeline numbers them), zero-padded to the widest teacher."""
    shape = (len(clip_ids), len(self._tables), self.width)
    audio, text = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for k, (teacher_audio, teacher_text, clip_rows, caption_rows) in enumerate(self._tables):
      width = teacher_audio.shape[1]
      audio[:, k, :width] = teacher_audio[clip_rows[clip_ids]]
      text[:, k, :width] = teacher_text[caption_rows[clip_ids] + caption_index]
    return audio, text

  def add_to(self, batches):
    """`batches` (numpy dicts with clip_id and caption_index) with AUDIO_KEY and TEXT_KEY added."""
    for batch in batches:
      audio, text = self.lookup(batch["clip_id"], batch["caption_index"])
      yield {**batch, AUDIO_KEY: audio, TEXT_KEY: text}


def batch_teachers(batch: dict) -> tuple | None:
  """The loss's `teachers` argument from a (device) batch: (audio, text), or None when the batch has none."""
  return (batch[AUDIO_KEY], batch[TEXT_KEY]) if AUDIO_KEY in batch else None
