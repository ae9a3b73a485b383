"""Retrieval for users: index a folder of audio files with a trained workdir, query it with text and with audio."""

import csv
import dataclasses
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
from atr_jax import api, model_identity, retrieve
from data_pipelines import features

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tiny_trained):
  config, workdir = tiny_trained
  return workdir, config.data.raw_dir


@pytest.mark.slow
def test_index_is_batch_independent_and_skips_broken_files(trained, tmp_path):
  workdir, raw_dir = trained
  audio_dir = tmp_path / "audio"
  shutil.copytree(os.path.join(raw_dir, "evaluation"), audio_dir / "sub")
  (audio_dir / "broken.wav").write_bytes(b"RIFF....not audio")
  (audio_dir / "notes.txt").write_text("not an audio file")
  paths = retrieve.audio_files(str(audio_dir))
  assert len(paths) == 9 and not any(p.endswith(".txt") for p in paths)

  retriever = api.Model(workdir)
  batched, kept, skipped = retriever.embed_audio_files(paths, batch_size=4)
  assert [p for p, _ in skipped] == [str(audio_dir / "broken.wav")] and len(kept) == 8
  one_by_one = np.concatenate([retriever.embed_audio_files([p], batch_size=1)[0] for p in kept])
  np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)

  index = str(tmp_path / "index")
  retrieve.write_index(index, batched, kept, {"step": 1})
  retrieve.write_index(index, batched[:3], kept[:3], {"step": 2})  # Replacing an index leaves no debris.
  embeddings, files = retrieve.read_index(index)
  assert files == kept[:3] and embeddings.shape == (3, batched.shape[1])
  assert sorted(os.listdir(tmp_path)) == ["audio", "index"]


class _Killed(Exception):
  pass


@pytest.mark.slow
def test_killed_index_run_resumes_to_the_same_index(trained, tmp_path, monkeypatch):
  workdir, raw_dir = trained
  audio_dir = tmp_path / "audio"
  for split in ("development", "evaluation"):
    shutil.copytree(os.path.join(raw_dir, split), audio_dir / split)
  (audio_dir / "broken.wav").write_bytes(b"RIFF....not audio")
  monkeypatch.setattr(api, "CHUNK_BATCHES", 1)  # Chunks of 8 files (a batch on the 8 devices): 33 files, 5 chunks.
  retriever = api.Model(workdir)
  whole, index = str(tmp_path / "whole"), str(tmp_path / "index")
  retrieve.index_folder(retriever, str(audio_dir), whole, batch_size=8)

  write_chunk, written = retriever._write_chunk, []

  def write_counted(name, outcomes, batch_size, die_after=None):
    if len(written) == die_after:
      raise _Killed  # While embedding this chunk, the next one decoding meanwhile.
    write_chunk(name, outcomes, batch_size)
    written.append(os.path.basename(name))

  monkeypatch.setattr(retriever, "_write_chunk", functools.partial(write_counted, die_after=2))
  with pytest.raises(_Killed):
    retrieve.index_folder(retriever, str(audio_dir), index, batch_size=8)
  work_dir = tmp_path / "index.partial"
  assert not os.path.exists(index)
  assert sorted(os.listdir(work_dir)) == ["chunk-000000.npz", "chunk-000001.npz", "clips", "progress.json"]
  (work_dir / "chunk-000002.npz.partial").write_bytes(b"half a chunk")  # A kill in the middle of a write.

  written.clear()
  monkeypatch.setattr(retriever, "_write_chunk", write_counted)
  kept, skipped = retrieve.index_folder(retriever, str(audio_dir), index, batch_size=8)
  assert written == [f"chunk-00000{n}.npz" for n in (2, 3, 4)]
  assert [path for path, _ in skipped] == [str(audio_dir / "broken.wav")] and len(kept) == 32
  (embeddings, files), (expected_embeddings, expected_files) = retrieve.read_index(index), retrieve.read_index(whole)
  assert files == expected_files and len(files) == 32
  np.testing.assert_array_equal(embeddings, expected_embeddings)
  assert sorted(os.listdir(tmp_path)) == ["audio", "index", "whole"]  # The work folders are gone.


def _peak_traced_bytes(function, *args, **kwargs) -> int:
  """Peak bytes that Python and numpy allocate while `function(*args, **kwargs)` runs (tracemalloc)."""
  tracemalloc.start()
  try:
    function(*args, **kwargs)
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


@pytest.mark.slow
def test_index_memory_does_not_grow_with_the_number_of_files(trained, tmp_path):
  workdir, _ = trained
  rng = np.random.default_rng(0)
  samples = int(0.2 * features.SAMPLE_RATE)
  for number in range(5000):
    sf.write(str(tmp_path / f"{number:04d}.wav"), 0.1 * rng.standard_normal(samples), features.SAMPLE_RATE)
  paths = retrieve.audio_files(str(tmp_path))
  retriever = api.Model(workdir)
  retriever.embed_audio_files(paths[:64], batch_size=64)  # Compiles the batch shape outside the measurements.
  peak_1000 = _peak_traced_bytes(retriever.embed_audio_files, paths[:1000], batch_size=64)
  peak_5000 = _peak_traced_bytes(retriever.embed_audio_files, paths, batch_size=64)
  clip_bytes = features.num_frames(samples) * features.N_MELS * 2  # One decoded clip (a float16 log-mel).
  # Whole-folder decoding would hold 4000 more decoded clips; streaming holds only 4000 more embeddings and names.
  assert peak_5000 - peak_1000 < 4000 * clip_bytes / 4, (peak_1000, peak_5000)


def test_top_k_is_sorted_and_exact():
  rng = np.random.default_rng(0)
  embeddings = rng.standard_normal((50, 8)).astype(np.float32)
  query = rng.standard_normal(8).astype(np.float32)
  indices, scores = api.ranked_top_k(embeddings, query, 5)
  np.testing.assert_array_equal(indices, np.argsort(-(embeddings @ query))[:5])
  assert np.all(np.diff(scores) <= 0)
  assert len(api.ranked_top_k(embeddings, query, 500)[0]) == 50


def test_read_captions_formats(tmp_path):
  (tmp_path / "c.txt").write_text("a dog barks\n\n  rain falls  \n")
  assert retrieve.read_captions(str(tmp_path / "c.txt")) == ["a dog barks", "rain falls"]
  (tmp_path / "c.csv").write_text("file_name,caption_1,caption_2\na.wav,one,two\nb.wav,three,\n")
  assert retrieve.read_captions(str(tmp_path / "c.csv")) == ["one", "two", "three"]
  (tmp_path / "bad.csv").write_text("file_name,text\na.wav,one\n")
  with pytest.raises(ValueError, match="caption"):
    retrieve.read_captions(str(tmp_path / "bad.csv"))


def _retrieve_cli(capsys, *args: str) -> list[str]:
  """Runs `python -m atr_jax.retrieve ARGS` in this process (its flags parsed as the command line would be); the
  printed lines."""
  import logging

  from absl import flags

  absl_level = logging.getLogger("absl").level  # Parsing sets it from --verbosity; later tests' caplog needs it back.
  flags.FLAGS.unparse_flags()
  try:
    retrieve.main(flags.FLAGS(["atr_jax.retrieve", *args]))
  finally:
    flags.FLAGS.unparse_flags()
    logging.getLogger("absl").setLevel(absl_level)
  return capsys.readouterr().out.strip().splitlines()


@pytest.mark.slow
def test_cli_index_then_text_and_audio_queries(trained, tmp_path, capsys):
  workdir, raw_dir = trained
  audio_dir = os.path.join(raw_dir, "evaluation")
  index = str(tmp_path / "index")
  run = functools.partial(_retrieve_cli, capsys, f"--workdir={workdir}")
  assert run("index", f"--audio_dir={audio_dir}", f"--index={index}")[-1].startswith("indexed 8 files (0 skipped)")
  with open(os.path.join(index, "files.json")) as f:
    recorded = json.load(f)
  assert sorted(recorded["files"]) == sorted(os.listdir(audio_dir))
  assert recorded["model_fingerprint"] == model_identity.of_workdir(workdir).fingerprint  # Checked by `text`.

  lines = run("text", f"--index={index}", "--query=a dog barks", "--top_k=3")
  assert lines[0] == "a dog barks" and len(lines) == 4 and all(line.strip().endswith(".wav") for line in lines[1:])

  captions = os.path.join(raw_dir, "clotho_captions_evaluation.csv")
  wav = os.path.join(audio_dir, sorted(os.listdir(audio_dir))[0])
  ranking = run("audio", f"--audio={wav}", f"--captions={captions}", "--top_k=5")
  assert ranking[0] == wav and len(ranking) == 6

  # No index: the folder is embedded now, with the same answer.
  assert run("text", f"--audio_dir={audio_dir}", "--query=a dog barks", "--top_k=3") == lines

  submission = str(tmp_path / "submission.csv")
  dev_dir = os.path.join(raw_dir, "development")  # 24 clips: the top 10 of each caption.
  run("submission", f"--audio_dir={dev_dir}", f"--captions={captions}", f"--out={submission}")
  with open(submission) as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["caption"] + [f"fname_{i}" for i in range(1, 11)] and len(rows) == 1 + 8 * 5
  assert all(len(set(row[1:])) == 10 and set(row[1:]) <= set(os.listdir(dev_dir)) for row in rows[1:])


@pytest.mark.slow
def test_cli_runs_as_a_module_and_names_a_missing_index(trained, tmp_path):
  workdir, _ = trained
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "atr_jax.retrieve",
      "text",
      f"--index={tmp_path / 'nowhere'}",
      "--query=x",
      f"--workdir={workdir}",
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"},
    timeout=300,
  )
  assert result.returncode != 0 and "is not an index" in result.stderr


def copy_run(workdir: str, destination, key: str, value) -> str:
  """A copy of the training workdir `workdir` at `destination` whose config.json holds `value` at the dotted `key`."""
  shutil.copytree(workdir, destination)
  return set_in_config(str(destination), key, value)


def set_in_config(workdir: str, key: str, value) -> str:
  """`workdir`, its config.json changed to hold `value` at the dotted `key`."""
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    config = json.load(f)
  *parents, leaf = key.split(".")
  functools.reduce(dict.__getitem__, parents, config)[leaf] = value
  with open(path, "w") as f:
    json.dump(config, f)
  return workdir


def _write_index_of(index: str, audio_dir: str, source: dict) -> None:
  embeddings = np.random.default_rng(0).standard_normal((3, 16))
  retrieve.write_index(index, embeddings, ["a.wav", "b.wav", "c.wav"], {"audio_dir": audio_dir, **source})


def test_an_index_is_queried_only_by_the_model_that_made_it(trained, tmp_path, caplog):
  workdir, _ = trained
  made_by = model_identity.of_workdir(workdir)
  index, audio_dir = str(tmp_path / "index"), str(tmp_path / "audio")
  _write_index_of(index, audio_dir, made_by.record())
  retrieve.check_index_matches(index, made_by)
  shutil.copytree(workdir, tmp_path / "moved")  # A moved or copied workdir is the same model.
  retrieve.check_index_matches(index, model_identity.of_workdir(str(tmp_path / "moved")))

  other = model_identity.of_workdir(copy_run(workdir, tmp_path / "other", "model.text.max_len", 12))
  assert other.step == made_by.step and other.fingerprint != made_by.fingerprint
  with pytest.raises(model_identity.ModelMismatch) as error:
    retrieve.check_index_matches(index, other)
  assert str(error.value) == (
    f"the index {index} was made by {workdir} at step {made_by.step} (model config {made_by.fingerprint}), not by "
    f"the model using it: {other.workdir} at step {made_by.step} (model config {other.fingerprint}); config "
    f"changes: model.text.max_len: 16 -> 12. Rebuild it: python -m atr_jax.retrieve index --workdir={other.workdir} "
    f"--audio_dir={audio_dir} --index={index}"
  )

  later = dataclasses.replace(made_by, step=made_by.step + 3)  # The run trained on: another best checkpoint.
  with pytest.raises(model_identity.ModelMismatch, match=rf"at step {made_by.step}\b.* at step {made_by.step + 3}\b"):
    retrieve.check_index_matches(index, later)

  # An index written before fingerprints: checked by its step, else readable with a warning to rebuild it.
  _write_index_of(index, audio_dir, {"workdir": workdir, "step": made_by.step})
  with caplog.at_level(logging.WARNING, logger="absl"):
    retrieve.check_index_matches(index, made_by)
  assert "records no model fingerprint" in caplog.text and "cannot be checked" in caplog.text
  assert f"Rebuild it: python -m atr_jax.retrieve index --workdir={workdir} --audio_dir={audio_dir}" in caplog.text
  assert len(retrieve.read_index(index)[1]) == 3
  with pytest.raises(model_identity.ModelMismatch, match=rf"at step {made_by.step}\b.* at step {made_by.step + 3}\b"):
    retrieve.check_index_matches(index, later)


@pytest.mark.slow
def test_cli_text_refuses_another_models_index_in_one_line(trained, tmp_path):
  workdir, _ = trained
  index = str(tmp_path / "index")
  _write_index_of(index, str(tmp_path / "audio"), model_identity.of_workdir(workdir).record())
  other = copy_run(workdir, tmp_path / "other", "model.embed_dim", 24)
  result = subprocess.run(
    [sys.executable, "-m", "atr_jax.retrieve", "text", f"--index={index}", "--query=x", f"--workdir={other}"],
    capture_output=True,
    text=True,
    cwd=REPO,
    env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"},
    timeout=300,
  )
  last = result.stderr.strip().splitlines()[-1]
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
  assert (
    last.startswith(f"error: the index {index} was made by {workdir} at step") and "model.embed_dim: 16 -> 24" in last
  )
  assert last.endswith(
    f"Rebuild it: python -m atr_jax.retrieve index --workdir={other} --audio_dir={tmp_path / 'audio'} --index={index}"
  )
