"""A restart that would not continue the run in its workdir: a changed config key (RESUME_KEYS) or changed training
data (the fingerprint saved with each checkpoint) stops it with an error naming what changed, unless allowed, and
then the run says how it continues; a resume that fails leaves the workdir byte-identical; a damaged checkpoint ends
the command with our one-line error alone."""

import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import ml_collections
import pytest
from tiny_run import tiny_config

from atr_jax import checkpointing, resume, train
from atr_jax.train_state import make_schedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH = 24 * 5 // 16  # The tiny run: 24 clips of 5 captions, global batch 16.


def _source(**changes) -> dict:
  entry = {
    "dataset": "clotho",
    "split": "development",
    "data_dir": "/prepared/clotho/1.2.0",
    "clips": 24,
    "captions": 120,
    "sources_sha1": "a" * 40,
    "split_sha1": "b" * 40,
  }
  return {**entry, **changes}


def _fingerprint(*sources, steps_per_epoch=7) -> dict:
  return {"sources": list(sources), "steps_per_epoch": steps_per_epoch}


def test_data_changes_name_the_source_the_counts_and_the_steps_per_epoch():
  saved = _fingerprint(_source(), _source(dataset="audiocaps", split="train", data_dir="/p/ac"))
  assert resume.data_changes(saved, saved) == []
  # Another folder with the same contents (data.data_dir is a config key) is the same data.
  assert resume.data_changes(saved, _fingerprint(_source(data_dir="/elsewhere"), saved["sources"][1])) == []

  fewer = _fingerprint(_source(clips=20, captions=100, split_sha1="c" * 40), saved["sources"][1], steps_per_epoch=6)
  assert resume.data_changes(saved, fewer) == [
    "clotho development (/prepared/clotho/1.2.0): its clips, captions or clip lengths changed (24 -> 20 clips, "
    "120 -> 100 captions)",
    "steps per epoch: 7 -> 6",
  ]
  # Sources prepared again (an audio file modified in place, another split's CSV edited), the split's table the same.
  [change] = resume.data_changes(
    saved, _fingerprint(saved["sources"][0], {**saved["sources"][1], "sources_sha1": "d" * 40})
  )
  assert change.startswith("audiocaps train (/p/ac): prepared again from changed sources") and "24 clips" in change
  # An extra source added (with --allow_config_change for data.extra_train).
  added = _fingerprint(
    *saved["sources"], _source(dataset="wavcaps", split="train", data_dir="/p/wc"), steps_per_epoch=9
  )
  assert resume.data_changes(saved, added) == ["wavcaps train (/p/wc): added", "steps per epoch: 7 -> 9"]
  assert resume.data_changes(added, saved) == ["wavcaps train (/p/wc): removed", "steps per epoch: 9 -> 7"]


def test_the_position_and_the_bookkeeping_after_a_change_of_steps_per_epoch():
  assert resume.position(14, 7) == (2, 0)
  assert resume.position(14, 8) == (1, 6)
  assert resume.position(0, 5) == (0, 0)
  text = resume.bookkeeping(14, 7, 8, 2, (1e-4, 5e-5))
  assert "global step 14 is kept" in text
  assert "At 7 steps an epoch the run continued with batch 0 of epoch 3" in text
  assert "at 8 it continues with batch 6 of epoch 2 (the first 6 batches" in text
  assert "rebuilt for 8 steps an epoch (16 steps in all, was 14)" in text
  assert "step 15 learns at 5e-05 (was 0.0001)" in text
  assert "past the last step" not in text
  assert "past the last step of the new schedule (10)" in resume.bookkeeping(14, 7, 5, 2, (1e-4, 1e-4))


def _workdir_with_config(tmp_path, config) -> str:
  workdir = tmp_path / "run"
  os.makedirs(workdir / "checkpoints" / "7")
  (workdir / checkpointing.CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
  return str(workdir)


@pytest.mark.parametrize(
  "key, value",
  [
    ("data.wavcaps_exclude_csv", "/data/blacklist_clotho.full.csv"),
    ("data.audiocaps_file_pattern", "{youtube_id}_{start_time}.flac"),
    ("data.data_dir", "/data/prepared"),
    ("data.extra_train", "audiocaps:/data/audiocaps:train"),
  ],
)
def test_resume_keys_cover_the_data_folders_and_sources(tmp_path, key, value):
  config = tiny_config(tmp_path)
  workdir = _workdir_with_config(tmp_path, config)
  assert resume.changed_config_keys(config, workdir) == []
  changed = ml_collections.ConfigDict(config.to_dict())
  section, name = key.split(".")
  changed[section][name] = value
  [line] = resume.changed_config_keys(changed, workdir)
  assert line.startswith(f"{key}: ") and line.endswith(f"-> {value!r}")


def test_path_keys_compare_as_absolute_paths(tmp_path, monkeypatch):
  config = tiny_config(tmp_path)
  config.data.wavcaps_exclude_csv = str(tmp_path / "ids.csv")
  workdir = _workdir_with_config(tmp_path, config)
  monkeypatch.chdir(tmp_path)
  relative = ml_collections.ConfigDict(config.to_dict())
  relative.data.update(wavcaps_exclude_csv="ids.csv", data_dir="prepared", raw_dir="raw")
  assert resume.changed_config_keys(relative, workdir) == []


def test_a_key_newer_than_the_saved_run_is_not_a_change(tmp_path):
  config = tiny_config(tmp_path)
  workdir = _workdir_with_config(tmp_path, config)
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    saved = json.load(f)
  del saved["data"]["extra_train_max_frames"]  # As a run of a version before the key wrote it.
  with open(path, "w") as f:
    json.dump(saved, f)
  assert resume.changed_config_keys(config, workdir) == []
  changed = ml_collections.ConfigDict(config.to_dict())
  changed.data.train_max_frames = 64
  assert resume.changed_config_keys(changed, workdir) == [
    f"data.train_max_frames: {config.data.train_max_frames!r} -> 64"
  ]


def _hashes(folder: str) -> dict[str, str]:
  """sha1 of every file below `folder` by relative path (links by their target)."""
  hashes = {}
  for path in glob.glob(os.path.join(folder, "**", "*"), recursive=True):
    name = os.path.relpath(path, folder)
    if os.path.islink(path):
      hashes[name] = "link to " + os.readlink(path)
    elif os.path.isfile(path):
      with open(path, "rb") as f:
        hashes[name] = hashlib.sha1(f.read()).hexdigest()
    else:
      hashes[name] = "folder"
  return hashes


def _copy_run(tiny_trained, tmp_path) -> tuple[ml_collections.ConfigDict, str]:
  config, trained = tiny_trained
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir, symlinks=True)
  return ml_collections.ConfigDict(config.to_dict()), workdir


@pytest.mark.slow
def test_a_failed_restore_leaves_the_workdir_as_it_was(tiny_trained, tmp_path):
  """Another model config cannot restore the checkpoint: the error names it, and config.json still describes the
  model that saved it (retrieve, zeroshot and embed-train read it), as does every other file."""
  config, workdir = _copy_run(tiny_trained, tmp_path)
  before = _hashes(workdir)
  config.model.embed_dim = 2 * config.model.embed_dim
  with pytest.raises(
    checkpointing.CheckpointError, match=rf"the checkpoint of step {2 * STEPS_PER_EPOCH} .* cannot be read"
  ):
    train.train_and_evaluate(config, workdir)
  assert _hashes(workdir) == before


def _add_development_clips(raw_dir: str, count: int) -> None:
  """`count` more development clips: copies of the first ones' audio under new names, with their captions."""
  csv_path = os.path.join(raw_dir, "clotho_captions_development.csv")
  with open(csv_path, encoding="utf-8") as f:
    header, *rows = f.read().splitlines()
  added = []
  for row in rows[:count]:
    name = row.split(",", 1)[0]
    copy = name.replace(".wav", "_copy.wav")
    shutil.copy(os.path.join(raw_dir, "development", name), os.path.join(raw_dir, "development", copy))
    added.append(copy + row[len(name) :])
  with open(csv_path, "w", encoding="utf-8") as f:
    f.write("\n".join([header, *rows, *added]) + "\n")


@pytest.mark.slow
def test_changed_data_is_refused_then_resumed_with_the_steps_recomputed(tiny_trained, tmp_path, caplog):
  """The run's data gains 4 clips (24 -> 28, 7 -> 8 steps an epoch) and is prepared again: the restart stops, naming
  the change, and leaves the workdir untouched; with allow_data_change the global step 14 is kept and training goes
  on with batch 6 of epoch 2 of the new data, to the end of the new schedule (step 16)."""
  config, workdir = _copy_run(tiny_trained, tmp_path)
  for key in ("raw_dir", "data_dir"):  # The run's own copy of its data, so that it can change.
    shutil.copytree(config.data[key], tmp_path / key)
    config.data[key] = str(tmp_path / key)
  with open(os.path.join(workdir, checkpointing.CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  _add_development_clips(config.data.raw_dir, 4)
  before = _hashes(workdir)
  last = 2 * STEPS_PER_EPOCH
  with pytest.raises(checkpointing.CheckpointError) as error:
    train.train_and_evaluate(config, workdir)
  message = str(error.value)
  assert f"the training data changed since the checkpoint of step {last}" in message
  assert "clotho development (" in message and "(24 -> 28 clips, 120 -> 140 captions)" in message
  assert "steps per epoch: 7 -> 8" in message and "--allow_data_change" in message
  assert _hashes(workdir) == before

  caplog.set_level(logging.INFO)
  train.train_and_evaluate(config, workdir, allow_data_change=True)
  learning_rate = float(make_schedule(config.optim, config.optim.learning_rate, 8, 2)(last))
  assert "continues with batch 6 of epoch 2" in caplog.text
  assert f"step {last + 1} learns at {learning_rate:.4g}" in caplog.text
  manager = checkpointing.create_manager(workdir, config.eval.selection_metric)
  assert manager.latest_step() == 16
  saved = checkpointing.saved_data_fingerprint(manager, 16)
  assert saved["steps_per_epoch"] == 8 and saved["sources"][0]["clips"] == 28
  with open(os.path.join(workdir, checkpointing.CONFIG_FILE)) as f:
    assert json.load(f)["data"]["raw_dir"] == config.data.raw_dir


def _write_config_file(tmp_path, config) -> str:
  """A config file giving `config`'s data, zero-shot and model (a tiny run's) to a command-line run."""
  path = tmp_path / "config.py"
  path.write_text(
    textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {os.path.join(REPO, "tests")!r})
      from tiny_run import tiny_config

      def get_config():
        config = tiny_config({str(tmp_path)!r})
        config.data.update(raw_dir={config.data.raw_dir!r}, data_dir={config.data.data_dir!r})
        config.eval.zeroshot.update(dataset={config.eval.zeroshot.dataset!r}, root={config.eval.zeroshot.root!r})
        return config
      """)
  )
  return str(path)


@pytest.mark.slow
def test_a_damaged_checkpoint_ends_the_command_with_our_error_alone(tiny_trained, tmp_path):
  """No traceback, no "Event loop is closed" from the reads the failed restore left in flight; the workdir keeps
  every file as it was (the run adds its log files only)."""
  config, workdir = _copy_run(tiny_trained, tmp_path)
  step = 2 * STEPS_PER_EPOCH
  for path in glob.glob(os.path.join(workdir, "checkpoints", str(step), "**", "*"), recursive=True):
    if os.path.isfile(path) and "/d/" in path:  # The array data files.
      with open(path, "r+b") as f:
        f.truncate(max(os.path.getsize(path) // 2, 1))
  before = _hashes(workdir)
  run = subprocess.run(
    [sys.executable, "-m", "atr_jax.main", "--config", _write_config_file(tmp_path, config), "--workdir", workdir],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert run.returncode == 1, run.stderr[-3000:]
  last_line = run.stderr.strip().splitlines()[-1]
  assert last_line.startswith(f"error: the checkpoint of step {step} ("), run.stderr[-3000:]
  assert "delete that folder" in last_line
  assert "Traceback" not in run.stderr and "Event loop is closed" not in run.stderr, run.stderr[-3000:]
  after = _hashes(workdir)
  assert {name: after[name] for name in before if name != "atr_jax.INFO"} == {
    name: digest for name, digest in before.items() if name != "atr_jax.INFO"
  }
  assert all(name.startswith("atr_jax.") for name in set(after) - set(before)), sorted(set(after) - set(before))
