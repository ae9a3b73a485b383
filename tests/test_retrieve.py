"""Retrieval for users: index a folder of audio files with a trained workdir, query it with text and with audio."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from atr_jax import retrieve

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

  retriever = retrieve.Retriever(workdir)
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


def test_top_k_is_sorted_and_exact():
  rng = np.random.default_rng(0)
  embeddings = rng.standard_normal((50, 8)).astype(np.float32)
  query = rng.standard_normal(8).astype(np.float32)
  indices, scores = retrieve.top_k(embeddings, query, 5)
  np.testing.assert_array_equal(indices, np.argsort(-(embeddings @ query))[:5])
  assert np.all(np.diff(scores) <= 0)
  assert len(retrieve.top_k(embeddings, query, 500)[0]) == 50


def test_read_captions_formats(tmp_path):
  (tmp_path / "c.txt").write_text("a dog barks\n\n  rain falls  \n")
  assert retrieve.read_captions(str(tmp_path / "c.txt")) == ["a dog barks", "rain falls"]
  (tmp_path / "c.csv").write_text("file_name,caption_1,caption_2\na.wav,one,two\nb.wav,three,\n")
  assert retrieve.read_captions(str(tmp_path / "c.csv")) == ["one", "two", "three"]
  (tmp_path / "bad.csv").write_text("file_name,text\na.wav,one\n")
  with pytest.raises(ValueError, match="caption"):
    retrieve.read_captions(str(tmp_path / "bad.csv"))


@pytest.mark.slow
def test_cli_index_then_text_and_audio_queries(trained, tmp_path):
  workdir, raw_dir = trained
  audio_dir = os.path.join(raw_dir, "evaluation")
  index = str(tmp_path / "index")
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  run = lambda *args: subprocess.run([sys.executable, "-m", "atr_jax.retrieve", *args, f"--workdir={workdir}"],  # noqa: E731
                                     capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  result = run("index", f"--audio_dir={audio_dir}", f"--index={index}")
  assert result.returncode == 0, result.stderr
  assert "indexed 8 files (0 skipped)" in result.stdout
  with open(os.path.join(index, "files.json")) as f:
    assert sorted(json.load(f)["files"]) == sorted(os.listdir(audio_dir))

  result = run("text", f"--index={index}", "--query=a dog barks", "--top_k=3")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert lines[0] == "a dog barks" and len(lines) == 4 and all(line.strip().endswith(".wav") for line in lines[1:])

  captions = os.path.join(raw_dir, "clotho_captions_evaluation.csv")
  wav = os.path.join(audio_dir, sorted(os.listdir(audio_dir))[0])
  result = run("audio", f"--audio={wav}", f"--captions={captions}", "--top_k=5")
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().splitlines()[0] == wav and len(result.stdout.strip().splitlines()) == 6

  result = run("text", f"--audio_dir={audio_dir}", "--query=a dog barks", "--top_k=3")  # No index: same answer.
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().splitlines() == lines

  submission = str(tmp_path / "submission.csv")
  dev_dir = os.path.join(raw_dir, "development")  # 24 clips: the top 10 of each caption.
  result = run("submission", f"--audio_dir={dev_dir}", f"--captions={captions}", f"--out={submission}")
  assert result.returncode == 0, result.stderr
  with open(submission) as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["caption"] + [f"fname_{i}" for i in range(1, 11)] and len(rows) == 1 + 8 * 5
  assert all(len(set(row[1:])) == 10 and set(row[1:]) <= set(os.listdir(dev_dir)) for row in rows[1:])

  result = run("text", f"--index={tmp_path / 'nowhere'}", "--query=x")
  assert result.returncode != 0 and "is not an index" in result.stderr
