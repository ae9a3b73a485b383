"""Frame and token features of a moment split from the shared tiny trained workdir: shapes and position values, the
frames against the workdir's own embedding of each 1 s window written as a file, the tokens against a float64
reference of the text head on the tower's states (and its mean-pooled embedding), and the cache: reused when
current, computed again when a recording or the checkpoint changes."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
import soundfile as sf

import atr_jax
from atr_jax import model_identity
from atr_jax.moments import features as moment_features
from data_pipelines import moments, synthetic

SR = 32000
DURATION = 5


@pytest.fixture(scope="module")
def moment_split(tmp_path_factory):
  root = tmp_path_factory.mktemp("moment_features")
  synthetic.generate(str(root / "raw"), {"development": 2, "validation": 3, "evaluation": 2}, seed=1, duration_s=2.0)
  moments.synthesize(str(root / "raw"), str(root / "set"), duration_s=DURATION, seed=0)
  return str(root / "set")


@pytest.fixture(scope="module")
def retriever(tiny_trained):
  return atr_jax.load(tiny_trained[1])


def _reference_head(params: dict, x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  if "linear" in params:
    y = x @ np.asarray(params["linear"]["kernel"], np.float64) + np.asarray(params["linear"]["bias"], np.float64)
  else:
    h = np.maximum(x @ np.asarray(params["fc1"]["kernel"], np.float64) + np.asarray(params["fc1"]["bias"]), 0)
    y = h @ np.asarray(params["fc2"]["kernel"], np.float64) + np.asarray(params["fc2"]["bias"], np.float64)
  return y / np.linalg.norm(y, axis=-1, keepdims=True)


@pytest.mark.slow
def test_frames_and_tokens(tiny_trained, retriever, moment_split, tmp_path):
  _, workdir = tiny_trained
  annotations = os.path.join(moment_split, "val.jsonl")
  split = moment_features.split_features(workdir, annotations, os.path.join(moment_split, "val"))
  dim = retriever.config.model.embed_dim
  assert os.path.isfile(os.path.join(moment_features.default_cache_dir(annotations, workdir, "clap_like"), "done.json"))
  assert not split.skipped and len(split.queries) == 3
  vid = split.queries[0].vid
  frames = split.frames[vid]
  assert frames.shape == (DURATION, dim + 2) and frames.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(frames[:, :dim], axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(frames[:, dim], np.arange(DURATION) / DURATION, atol=1e-6)
  np.testing.assert_allclose(frames[:, dim + 1], np.arange(1, DURATION + 1) / DURATION, atol=1e-6)
  # Each frame is the workdir's embedding of that second of the recording as a file of its own.
  audio, _ = sf.read(os.path.join(moment_split, "val", vid + ".wav"), dtype="float32")
  paths = []
  for second in (0, DURATION - 1):
    paths.append(str(tmp_path / f"second{second}.wav"))
    sf.write(paths[-1], audio[second * SR : (second + 1) * SR], SR, subtype="FLOAT")
  expected, kept, _ = retriever.embed_audio_files(paths, workers=1)
  assert kept == paths
  np.testing.assert_allclose(frames[[0, DURATION - 1], :dim], expected, atol=2e-5)

  # Tokens: the text head on each non-padding hidden state, against a float64 reference.
  query = split.queries[0]
  tokens = split.tokens[query.qid]
  encoded = retriever.encode_captions([query.query])
  mask = encoded["attention_mask"][0].astype(bool)
  assert tokens.shape == (mask.sum(), dim) and tokens.dtype == np.float32
  model = moment_features.build_model(retriever.config.model)
  hidden = model.apply(
    retriever.variables,
    encoded["input_ids"],
    encoded["attention_mask"],
    method=lambda module, ids, m: module.text(ids, m, False)[0],
  )
  hidden = np.asarray(jax.device_get(hidden), np.float64)[0][mask]
  head = jax.device_get(retriever.variables["params"]["text_head"])
  np.testing.assert_allclose(tokens, _reference_head(head, hidden), atol=2e-5)
  if retriever.config.model.text.pooling == "mean":  # The reference ties to the dual encoder's own text embedding.
    pooled = _reference_head(head, hidden.mean(axis=0, keepdims=True))
    np.testing.assert_allclose(pooled, retriever.embed_text([query.query]), atol=2e-5)


def _fail(*args, **kwargs):
  raise AssertionError("features were computed again")


@pytest.mark.slow
def test_cache_reused_then_invalidated(tiny_trained, moment_split, tmp_path, monkeypatch):
  _, workdir = tiny_trained
  data = str(tmp_path / "set")
  shutil.copytree(moment_split, data)
  annotations, audio_dir = os.path.join(data, "val.jsonl"), os.path.join(data, "val")
  first = moment_features.split_features(workdir, annotations, audio_dir)

  with monkeypatch.context() as patch:
    patch.setattr(moment_features, "Featurizer", _fail)
    again = moment_features.split_features(workdir, annotations, audio_dir)
  assert again.frames.keys() == first.frames.keys()
  for vid in first.frames:
    np.testing.assert_array_equal(again.frames[vid], first.frames[vid])

  # A recording changes: computed again, and the changed recording's frames change.
  vid = first.queries[0].vid
  path = os.path.join(audio_dir, vid + ".wav")
  audio, _ = sf.read(path, dtype="float32")
  sf.write(path, audio[::-1].copy(), SR, subtype="PCM_16")
  calls = []
  real = moment_features.Featurizer

  def counting(*args):
    calls.append(args)
    return real(*args)

  monkeypatch.setattr(moment_features, "Featurizer", counting)
  changed = moment_features.split_features(workdir, annotations, audio_dir)
  assert len(calls) == 1
  assert not np.allclose(changed.frames[vid], first.frames[vid])

  # Another checkpoint step (the workdir trained on): computed again.
  identity = model_identity.of_workdir(workdir)
  step = identity.step
  monkeypatch.setattr(model_identity, "of_workdir", lambda _: dataclasses.replace(identity, step=step + 1))
  moment_features.split_features(workdir, annotations, audio_dir)
  assert len(calls) == 2
  cache = moment_features.default_cache_dir(annotations, workdir, "clap_like")
  with open(os.path.join(cache, moment_features.FINGERPRINT_FILE)) as f:
    assert json.load(f)["model"]["step"] == step + 1

  # A missing recording is skipped and reported, its queries left out.
  os.remove(path)
  missing = moment_features.split_features(workdir, annotations, audio_dir)
  assert [v for v, _ in missing.skipped] == [vid] and "missing_audio" in missing.skipped[0][1]
  assert vid not in missing.frames and all(q.vid != vid for q in missing.queries)
