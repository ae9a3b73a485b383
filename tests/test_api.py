"""The Python API (`atr_jax.load`): its embeddings are evaluation's and `retrieve`'s (the same files and captions of
the tiny trained workdir's synthetic set), its ranking is numpy's, its errors name what is wrong, and `import
atr_jax` stays cheap."""

import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import soxr

import atr_jax
from atr_jax import api, model_identity, retrieve, train
from data_pipelines import features

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model(tiny_trained):
  return atr_jax.load(tiny_trained[1])


@pytest.fixture(scope="module")
def evaluated(tiny_trained):
  """The evaluation split as training's evaluation embeds it (train's own setup, restore and `embed`)."""
  config, workdir = tiny_trained
  setup = train._Setup(config, workdir, training=False)
  state, shardings = setup.fresh_state()
  state = setup.restore(setup.manager.best_step(), state, shardings)
  return setup.embed(state, config.data.test_split)


@pytest.mark.slow
def test_embeddings_are_evaluations(model, evaluated, tiny_trained):
  config, _ = tiny_trained
  np.testing.assert_allclose(model.embed_text(evaluated.captions), evaluated.text, atol=1e-6)
  np.testing.assert_allclose(model.embed_text(evaluated.captions[:1])[0], evaluated.text[0], atol=1e-6)
  paths = [os.path.join(config.data.raw_dir, config.data.test_split, name) for name in evaluated.file_names]
  np.testing.assert_allclose(model.embed_audio(paths, batch_size=4), evaluated.audio, atol=1e-6)
  # The same clips as arrays (reversed: the order is the caller's), one as two channels whose mean is the clip.
  arrays, rates = zip(*(sf.read(path, dtype="float32") for path in reversed(paths)))
  other = 0.5 * np.resize(arrays[1], len(arrays[0]))
  arrays = [np.stack([arrays[0] + other, arrays[0] - other], axis=1), *arrays[1:]]
  from_arrays = model.embed_audio(arrays, sample_rate=rates[0])
  np.testing.assert_allclose(from_arrays, evaluated.audio[::-1], atol=1e-6)
  assert not np.allclose(evaluated.audio[0], evaluated.audio[1], atol=1e-3)  # Distinct clips: the check means it.


@pytest.mark.slow
def test_embeddings_are_retrieves_and_search_ranks_them(model, tiny_trained, tmp_path):
  config, workdir = tiny_trained
  audio_dir = os.path.join(config.data.raw_dir, config.data.test_split)
  index = str(tmp_path / "index")
  retrieve.index_folder(model, audio_dir, index, batch_size=8)  # What `retrieve index` writes.
  embeddings, files = api.read_index(index)
  # A mixed list (paths and arrays in one call), and a FLAC file at 44.1 kHz against its samples.
  samples, rate = sf.read(os.path.join(audio_dir, files[2]), dtype="float32")
  mixed = [os.path.join(audio_dir, files[0]), samples]
  np.testing.assert_allclose(model.embed_audio(mixed, sample_rate=rate), embeddings[[0, 2]], atol=1e-6)
  sf.write(tmp_path / "44k.flac", soxr.resample(samples, rate, 44100), 44100)
  decoded, decoded_rate = sf.read(tmp_path / "44k.flac", dtype="float32")
  from_file = model.embed_audio([str(tmp_path / "44k.flac")])
  np.testing.assert_allclose(from_file, model.embed_audio([decoded], sample_rate=decoded_rate), atol=1e-6)
  assert np.abs(from_file[0] - embeddings[2]).max() < 0.05  # The same sound, resampled twice.

  queries = ["a high beep getting louder", "two low knocks then a buzz"]
  text = model.embed_text(queries)
  expected = np.argsort(-(embeddings.astype(np.float64) @ text[1].astype(np.float64).T))[:3]
  for found in (model.search(queries, index, top_k=3)[1], model.search(text[1], (embeddings, files), top_k=3)):
    assert [name for name, _ in found] == [files[i] for i in expected]
    np.testing.assert_allclose([score for _, score in found], embeddings[expected] @ text[1], atol=1e-6)
  assert len(model.search(queries[0], index, top_k=100)) == len(files)
  other = str(tmp_path / "other_index")  # The same index, as if made by another checkpoint of the run.
  api.write_index(other, embeddings, files, {**api.read_index_record(index), "step": model.step + 1, "files": files})
  with pytest.raises(model_identity.ModelMismatch, match=f"the index {other} was made by .* at step {model.step + 1}"):
    model.search(queries[0], other)


def test_similarity_is_cosine(model):
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((3, model.embed_dim)), rng.standard_normal((5, model.embed_dim))
  expected = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
  np.testing.assert_allclose(model.similarity(a, b), expected, atol=1e-6)
  np.testing.assert_allclose(model.similarity(a[1], b), expected[1], atol=1e-6)
  with pytest.raises(ValueError, match=r"b has shape \(5, 3\)"):
    model.similarity(a, b[:, :3])


def test_bad_input_is_named(model, tiny_trained, tmp_path):
  config, workdir = tiny_trained
  missing = str(tmp_path / "missing.wav")
  with pytest.raises(FileNotFoundError, match=f"audio file {missing} does not exist"):
    model.embed_audio([missing])
  broken = tmp_path / "broken.wav"
  broken.write_bytes(b"RIFF....not audio at all")
  with pytest.raises(features.AudioError, match=f"cannot read audio file {broken}"):
    model.embed_audio([str(broken)])
  clip = 0.1 * np.random.default_rng(0).standard_normal(16000).astype(np.float32)
  with pytest.raises(ValueError, match="sample_rate is missing"):
    model.embed_audio([clip])
  for rate in (0, -16000, "16000", float("nan")):
    with pytest.raises(ValueError, match="sample_rate=.* must be a positive number"):
      model.embed_audio([clip], sample_rate=rate)
  with pytest.raises(TypeError, match=r"files_or_arrays\[1\] is a int16 array"):
    model.embed_audio([clip, (clip * 1000).astype(np.int16)], sample_rate=16000)
  with pytest.raises(features.AudioError, match=r"files_or_arrays\[0\]: clip of 100 samples is too short"):
    model.embed_audio([clip[:50]], sample_rate=16000)
  with pytest.raises(ValueError, match="files_or_arrays is an empty list"):
    model.embed_audio([])
  with pytest.raises(TypeError, match="files_or_arrays must be a list"):
    model.embed_audio(missing)
  with pytest.raises(ValueError, match="texts is an empty list"):
    model.embed_text([])
  with pytest.raises(TypeError, match=r"wrap one text: \[text\]"):
    model.embed_text("a dog barks")
  with pytest.raises(FileNotFoundError, match=f"{tmp_path} is not an index"):
    model.search("a dog barks", str(tmp_path))
  with pytest.raises(ValueError, match="index holds 3-d embeddings; this model .* makes 16-d"):
    model.search("a dog barks", (np.ones((2, 3)), ["a.wav", "b.wav"]))
  with pytest.raises(ValueError, match="top_k=0 must be a positive integer"):
    model.search("a dog barks", (np.ones((2, 16)), ["a.wav", "b.wav"]), top_k=0)
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}/config.json is missing"):
    atr_jax.load(str(tmp_path))


def test_import_is_cheap_and_load_is_documented():
  code = (
    "import sys, pydoc, atr_jax; print(sorted({'jax', 'tensorflow', 'flax', 'numpy'} & set(sys.modules))); "
    "print(pydoc.render_doc(atr_jax.load))"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
  first, doc = result.stdout.split("\n", 1)
  assert first == "[]"
  for documented in ("workdir", "embed_text", "embed_audio", "sample_rate", "similarity", "search", "top_k"):
    assert documented in doc
