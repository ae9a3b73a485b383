"""Embedding clips whole or in segments (`atr_jax.evaluation`, `input_pipeline.segment_batches`): a split is read in
one pass, a clip's embedding equals that of the clip embedded alone (SPEC 6), and a clip longer than
eval.max_segment_s is the block-weighted mean of its segments' tower outputs, then the head and L2 normalisation,
computed here in float64 numpy; the tower never sees a longer input than the segments'."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_data_pipeline import counting_reads
from tiny_run import tiny_config

from atr_jax import evaluation, sharding
from atr_jax.models.dual_encoder import build_model
from atr_jax.models.registry import audio_inputs, audio_tower, example_audio
from data_pipelines import audio_forms, clotho, input_pipeline, synthetic

BLOCK, MIN_BLOCK = 1000, 16  # A segment weighs its 10 s blocks holding at least 16 frames (the rule, restated).


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(model, variables) of the tiny CNN14 dual encoder, randomly initialised."""
  config = tiny_config(tmp_path_factory.mktemp("tiny"))
  model = build_model(config.model)
  audio, mask = example_audio(audio_tower(config.model.audio), 1, 64)
  ids = jnp.ones((1, config.model.text.max_len), jnp.int32)
  return model, model.init(jax.random.key(0), audio, mask, ids, ids, train=False)


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
  """A synthetic Clotho-layout set: 6 evaluation clips of 2.5-3.5 s (251-351 frames)."""
  raw = str(tmp_path_factory.mktemp("raw") / "synthetic")
  synthetic.generate(raw, {"development": 1, "validation": 1, "evaluation": 6}, seed=3, duration_s=3.0)
  return clotho.prepare(raw, str(tmp_path_factory.mktemp("prepared")), workers=1)


def _stored_clips(builder, split: str) -> list:
  records = {int(r["clip_id"]): r["log_mel"] for r in builder.as_dataset(split=split).as_numpy_iterator()}
  return [records[i] for i in range(len(records))]


def _tower_alone(model, variables, clip: np.ndarray) -> np.ndarray:
  """The audio tower's output (float64) of one log-mel clip alone, at its own length, in eval mode."""
  x = jnp.asarray(clip.astype(np.float32))[None]
  mask = jnp.ones(x.shape[:2], bool)
  return np.asarray(model.apply(variables, x, mask, method=lambda m, a, k: m.audio(a, k, False)), np.float64)[0]


def _reference(model, variables, clip: np.ndarray, max_frames: int) -> np.ndarray:
  """The rule in float64 numpy: segments of max_frames frames from the start, each weighed by its 10 s blocks
  holding >= 16 frames (a last one without any left out), the weighted mean of their tower outputs, then the
  two-layer head and L2 normalisation."""
  if len(clip) <= max_frames:
    pieces, weights = [clip], [1]
  else:
    pieces = [clip[start : start + max_frames] for start in range(0, len(clip), max_frames)]
    weights = [sum(1 for b in range(0, len(p), BLOCK) if len(p) - b >= MIN_BLOCK) for p in pieces]
  return _projected(
    variables, sum(w * _tower_alone(model, variables, p) for p, w in zip(pieces, weights) if w) / sum(weights)
  )


def _projected(variables, outputs: np.ndarray) -> np.ndarray:
  """The two-layer audio head (Dense, ReLU, Dense) and L2 normalisation of a tower output, in float64."""
  head = jax.tree.map(lambda x: np.asarray(x, np.float64), variables["params"]["audio_head"])
  hidden = np.maximum(outputs @ head["fc1"]["kernel"] + head["fc1"]["bias"], 0.0)
  out = hidden @ head["fc2"]["kernel"] + head["fc2"]["bias"]
  return out / np.linalg.norm(out)


def _spy_on_tower(embedder: evaluation.Embedder) -> list:
  """The audio input shapes the embedder's tower is called with, from now on."""
  shapes, tower = [], embedder.tower

  def spy(variables, local_batch):
    shapes.append(audio_inputs(local_batch)[0].shape)
    return tower(variables, local_batch)

  embedder.tower = spy
  return shapes


@pytest.mark.slow
@pytest.mark.parametrize("max_segment_s, batch_size", [(30.0, 8), (30.0, 16), (1.0, 8)])
def test_split_embeddings_follow_the_rule_reading_each_record_once(
  tiny, builder, monkeypatch, max_segment_s, batch_size
):
  """embed_split (evaluation, validation, embed-train): each record read once; every clip's embedding is the rule's
  (30 s: the clip embedded whole and alone, whatever the batch size; 1 s = 101 frames: in 3-4 segments)."""
  from atr_jax.tokenization import load_tokenizer
  from atr_jax.models.bert import minilm_dir
  from data_pipelines.captions import CaptionEncoder

  model, variables = tiny
  embedder = evaluation.Embedder(model, sharding.create_mesh(), max_segment_s=max_segment_s)
  shapes = _spy_on_tower(embedder)
  clips = _stored_clips(builder, "evaluation")
  reads = counting_reads(builder, monkeypatch)
  encode = CaptionEncoder(load_tokenizer(minilm_dir(), 16), "reference")
  embedded = evaluation.embed_split(
    embedder,
    variables,
    builder,
    "evaluation",
    encode_captions=encode,
    global_batch_size=batch_size,
    max_frames=None,
  )
  assert reads == {clip_id: 1 for clip_id in range(len(clips))}
  max_frames = input_pipeline.max_segment_frames(max_segment_s, audio_forms.LOG_MEL)
  expected = np.stack([_reference(model, variables, clip, max_frames) for clip in clips])
  np.testing.assert_allclose(embedded.audio, expected, rtol=1e-5, atol=2e-6)
  assert max(shape[1] for shape in shapes) <= input_pipeline.padded_frames(max_frames)
  assert (max_frames < min(map(len, clips))) == (max_segment_s == 1.0)  # The 1 s case cuts every clip.


@pytest.mark.slow
def test_long_clips_are_the_block_weighted_mean_of_their_segments(tiny):
  """embed_clips (retrieval, zero-shot): clips of 7 to 41 s with 20 s segments (2001 frames): a 25.2 s clip weighs
  its segments 2 and 1, a 41 s one 2, 2 and 1 (a 0.98 s tail); the tower sees at most 2048 frames."""
  model, variables = tiny
  rng = np.random.default_rng(0)
  lengths = [2520, 700, 4100, 1000, 2001, 4010]  # The last: a 8-frame tail, left out.
  clips = [(rng.standard_normal((n, 64)) * 10 - 40).astype(np.float16) for n in lengths]
  embedder = evaluation.Embedder(model, sharding.create_mesh(), max_segment_s=20.0)
  shapes = _spy_on_tower(embedder)
  embedded = evaluation.embed_clips(embedder, variables, clips, audio_forms.LOG_MEL, global_batch_size=8)
  expected = np.stack([_reference(model, variables, clip, 2001) for clip in clips])
  np.testing.assert_allclose(embedded, expected, rtol=1e-5, atol=2e-6)
  assert max(shape[1] for shape in shapes) == input_pipeline.padded_frames(2001) == 2048
  # The weights matter: the unweighted mean of the 25.2 s clip's two segments is another embedding.
  halves = [_tower_alone(model, variables, clips[0][:2001]), _tower_alone(model, variables, clips[0][2001:])]
  assert not np.allclose(embedded[0], _projected(variables, (halves[0] + halves[1]) / 2), atol=1e-3)
