"""Which model made stored embeddings (an index, a teacher folder), and the check that it is the model about to use
them.

A model is identified by its workdir's best checkpoint step and a fingerprint of what in its config decides the
embeddings of a given checkpoint: the config keys EMBEDDING_KEYS as the workdir's config.json holds them (a key the
file lacks is left out, so a key added here later leaves older runs' fingerprints unchanged). The fingerprint is the
first 16 hex digits of the SHA-256 of their canonical JSON (sorted keys, tuples as lists). The workdir's path is
recorded but not compared: a moved or copied workdir is the same model. Two runs of one config stopped at the same
step are not told apart (the parameters are not hashed).
"""

import dataclasses
import hashlib
import json
import os
import shlex

import ml_collections
from absl import logging

from atr_jax import checkpointing
from configs.base import get_base_config

# Config keys (dotted) that change what a checkpoint makes of an input: the whole model section (towers, their front
# ends, max_len, heads, dtype), the stored audio form and the caption cleaning. Add a key here when it does too.
EMBEDDING_KEYS = ("model", "data.audio_feature", "data.caption_cleaning", "eval.max_segment_s")
_SHOWN = 5  # Differing config keys named in an error.
_ABSENT = object()


class ModelMismatch(ValueError):
  """Stored embeddings were made by another model than the one about to use them."""


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
  workdir: str
  step: int
  embedding_config: dict  # EMBEDDING_KEYS -> their values in the workdir's config (JSON types).

  @property
  def fingerprint(self) -> str:
    text = json.dumps(self.embedding_config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

  def record(self) -> dict:
    """What stored embeddings record of the model that made them (files.json, a teacher's manifest.json)."""
    return {
      "workdir": self.workdir,
      "step": self.step,
      "model_fingerprint": self.fingerprint,
      "embedding_config": self.embedding_config,
    }

  def __str__(self) -> str:
    return f"{self.workdir} at step {self.step} (model config {self.fingerprint})"


def of_config(workdir: str, step: int, config) -> ModelIdentity:
  """The identity of `config`'s model (a ConfigDict or the dict of a config.json) at checkpoint `step`."""
  tree = json.loads(config.to_json_best_effort()) if isinstance(config, ml_collections.ConfigDict) else config
  picked = {}
  for key in EMBEDDING_KEYS:
    value = tree
    for part in key.split("."):
      value = value.get(part, _ABSENT) if isinstance(value, dict) else _ABSENT
    if value is not _ABSENT:
      picked[key] = json.loads(json.dumps(value))
  return ModelIdentity(os.path.abspath(os.path.expanduser(workdir)), int(step), picked)


def _with_defaults(saved: dict, defaults: dict) -> dict:
  """`saved` with every key it lacks (a run of a version before the key existed) taken from `defaults`."""
  for key, value in defaults.items():
    if key not in saved:
      saved[key] = value
    elif isinstance(value, dict) and isinstance(saved[key], dict):
      _with_defaults(saved[key], value)
  return saved


def read_workdir(workdir: str):
  """(config, checkpoint manager, best step) of a training workdir (its config.json, keys added since it was written
  at their configs/base.py defaults); a FileNotFoundError naming what is missing."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  config_path = os.path.join(workdir, checkpointing.CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path} is missing: {workdir} is not a training workdir of atr_jax")
  with open(config_path) as f:
    config = ml_collections.ConfigDict(
      _with_defaults(json.load(f), json.loads(get_base_config().to_json_best_effort()))
    )
  manager = checkpointing.create_manager(workdir, config.eval.selection_metric)
  step = manager.best_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}: train first")
  return config, manager, step


def of_workdir(workdir: str) -> ModelIdentity:
  """The identity of a workdir's best checkpoint (read from its config.json and checkpoint metadata: no restore)."""
  config, manager, step = read_workdir(workdir)
  manager.close()
  return of_config(workdir, step, config)


def _flat(tree, prefix: str = "") -> dict:
  if not isinstance(tree, dict):
    return {prefix: tree}
  return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}.{key}" if prefix else key).items()}


def _differences(recorded: dict, current: dict) -> list:
  """'key: recorded -> current' for each config leaf that differs."""
  old, new = _flat(recorded), _flat(current)
  shown = lambda tree, key: repr(tree[key]) if key in tree else "absent"  # noqa: E731
  return [
    f"{key}: {shown(old, key)} -> {shown(new, key)}"
    for key in sorted(set(old) | set(new))
    if old.get(key, _ABSENT) != new.get(key, _ABSENT)
  ]


def check(recorded: dict, current: ModelIdentity, what: str, rebuild: list) -> None:
  """Raises ModelMismatch naming both models and the command `rebuild` (argv) unless `recorded` (a `record()`, as
  stored with the embeddings `what`) is `current`'s. Stored without a fingerprint (written before fingerprints
  were), it is only checked by step, and a warning says to rebuild it."""
  command = shlex.join(rebuild)
  made_by = f"{recorded.get('workdir', 'an unknown workdir')} at step {recorded.get('step', '?')}"
  if "model_fingerprint" not in recorded:
    if "step" in recorded and int(recorded["step"]) != current.step:
      raise ModelMismatch(f"{what} was made by {made_by}, not by the model using it: {current}. Rebuild it: {command}")
    logging.warning(
      "%s records no model fingerprint (made by %s before indexes and teacher folders recorded one): it cannot be "
      "checked against %s. Rebuild it: %s",
      what,
      made_by,
      current,
      command,
    )
    return
  if int(recorded["step"]) == current.step and recorded["model_fingerprint"] == current.fingerprint:
    return
  changed = _differences(recorded.get("embedding_config", {}), current.embedding_config)
  shown = f"; config changes: {', '.join(changed[:_SHOWN])}{' ...' if len(changed) > _SHOWN else ''}" if changed else ""
  raise ModelMismatch(
    f"{what} was made by {made_by} (model config {recorded['model_fingerprint']}), not by the model using it: "
    f"{current}{shown}. Rebuild it: {command}"
  )
