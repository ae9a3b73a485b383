"""Moment-model training and inference on precomputed features (atr_jax.moments.train): packing, window sampling,
the segment-and-merge rule for long recordings, and a tiny data-parallel train, evaluate and predict."""

import dataclasses
import os

import numpy as np
import pytest

from atr_jax.moments import train
from configs.base import get_base_config


@dataclasses.dataclass(frozen=True)
class Query:  # The fields of data_pipelines.moment_annotations.MomentQuery the trainer reads.
  qid: str
  vid: str
  duration: float
  windows: tuple


@dataclasses.dataclass
class Split:
  frames: dict
  tokens: dict
  queries: list


def _split(rng, num_recordings, dim=8, frames_range=(16, 28), prefix="r"):
  """Learnable features: a query's tokens are its event vector plus noise; the recording's frames inside the event's
  window are that vector plus noise, the others noise. 1 s hop; the last two columns are the frame's position."""
  frames, tokens, queries = {}, {}, []
  for r in range(num_recordings):
    num_frames = int(rng.integers(*frames_range))
    audio = rng.normal(0, 0.3, (num_frames, dim))
    vid = f"{prefix}{r}"
    events = []
    for k in range(1 + r % 2):
      event = rng.normal(size=dim)
      start = int(rng.integers(k * num_frames // 2, (k + 1) * num_frames // 2 - 4))
      end = start + int(rng.integers(2, 5))
      audio[start:end] += event
      qid = f"{vid}_{k}"
      tokens[qid] = (event + rng.normal(0, 0.1, (int(rng.integers(3, 6)), dim))).astype(np.float32)
      events.append(qid)
      queries.append(Query(qid, vid, float(num_frames), ((float(start), float(end)),)))
    positions = np.stack([np.arange(num_frames), np.arange(1, num_frames + 1)], -1) / num_frames
    frames[vid] = np.concatenate([audio, positions], -1).astype(np.float32)
  return Split(frames, tokens, queries)


def _config(tmp_path=None):
  config = get_base_config()
  config.moments.model.update(
    hidden_dim=16, num_heads=2, ffn_dim=32, num_cross_layers=1, num_encoder_layers=1, num_queries=4
  )
  config.moments.train.update(global_batch_size=8, num_epochs=2, max_frames=32, log_every_steps=1)
  return config


def test_segments_cover_the_recording_at_half_overlap():
  assert train.segment_starts(30, 32) == [0]
  assert train.segment_starts(32, 32) == [0]
  for num_frames in (33, 80, 97):
    starts = train.segment_starts(num_frames, 32)
    covered = np.zeros(num_frames, bool)
    for s in starts:
      covered[s : s + 32] = True
      assert s + 32 <= num_frames
    assert covered.all() and starts[-1] + 32 == num_frames
    assert all(b - a <= 16 for a, b in zip(starts, starts[1:]))


def test_merge_keeps_the_best_of_near_duplicates():
  windows = np.array([[0, 10, 0.5], [1, 10, 0.9], [20, 30, 0.4], [40, 45, 0.95], [20, 29.5, 0.1], [60, 61, 0.3]])
  merged = train.merge_windows(windows, merge_iou=0.7, keep=3)
  np.testing.assert_array_equal(merged, [[40, 45, 0.95], [1, 10, 0.9], [20, 30, 0.4]])


def test_pack_normalises_windows_by_the_frames_span_and_cuts_long_recordings():
  frames = {"a": np.ones((10, 3), np.float32), "b": np.ones((50, 3), np.float32)}
  tokens = {"a_0": np.ones((4, 1)), "b_0": np.ones((7, 1)), "b_1": np.ones((2, 1))}
  queries = [
    Query("a_0", "a", 10.0, ((2.0, 4.0), (6.0, 9.0))),
    Query("b_0", "b", 50.0, ((15.0, 25.0),)),  # Clipped to the first 20 frames.
    Query("b_1", "b", 50.0, ((30.0, 40.0),)),  # Outside them: dropped.
  ]
  arrays = train.pack(frames, tokens, queries, hop_s=1.0, max_frames=20, max_tokens=5)
  assert arrays.qids == ["a_0", "b_0"]
  np.testing.assert_allclose(arrays.span_s, [10.0, 20.0])
  np.testing.assert_allclose(arrays.windows[0], [[0.2, 0.4], [0.6, 0.9]])
  np.testing.assert_allclose(arrays.windows[1, 0], [0.75, 1.0])
  np.testing.assert_array_equal(arrays.window_mask, [[True, True], [True, False]])
  np.testing.assert_array_equal(arrays.audio_mask.sum(-1), [10, 20])
  np.testing.assert_array_equal(arrays.text_mask.sum(-1), [4, 5])
  with pytest.raises(ValueError, match="no query"):
    train.pack(frames, tokens, queries[2:], hop_s=1.0, max_frames=20, max_tokens=5)


def test_window_sampling_keeps_the_first_window():
  rng = np.random.default_rng(0)
  windows = rng.random((3, 7, 2)).astype(np.float32)
  mask = np.arange(7)[None] < np.array([[7], [3], [1]])
  draws = set()
  for _ in range(10):
    out, out_mask = train.sample_windows(windows, mask, 5, rng)
    np.testing.assert_array_equal(out_mask.sum(-1), [5, 3, 1])
    np.testing.assert_array_equal(out[:, 0], windows[:, 0])
    for i in range(3):
      rows = {tuple(w) for w in windows[i][mask[i]]}
      assert {tuple(w) for w in out[i][out_mask[i]]} <= rows
    draws.add(tuple(map(tuple, out[0])))
  assert len(draws) > 1


@pytest.mark.slow
def test_train_evaluate_and_predict_a_long_recording(tmp_path):
  rng = np.random.default_rng(1)
  config = _config()
  train_split, val_split = _split(rng, 16), _split(rng, 4, prefix="v")
  workdir = str(tmp_path / "run")
  best = train.train_and_evaluate(config, workdir, train_split, val_split, hop_s=1.0)
  assert set(best) == {"R1@0.5", "R1@0.7", "mAP", "mAP@0.5", "mAP@0.75"}
  assert os.listdir(os.path.join(workdir, "checkpoints"))
  params = train.restore_best_params(workdir)

  # A recording of 3.2x max_frames: segmented, merged, in seconds inside it.
  long = _split(rng, 1, frames_range=(100, 104), prefix="long")
  mesh = train.sharding.create_mesh()
  predictions = train.predict(params, config.moments, long.frames, long.tokens, long.queries, 1.0, mesh)
  assert [p["qid"] for p in predictions] == [q.qid for q in long.queries]
  for p, q in zip(predictions, long.queries):
    windows = np.array(p["pred_relevant_windows"])
    assert windows.shape == (config.moments.model.num_queries, 3)
    assert (windows[:, 0] >= 0).all() and (windows[:, 1] <= q.duration).all() and (windows[:, 0] < windows[:, 1]).all()
    assert (np.diff(windows[:, 2]) <= 0).all()
  # The same as predicting each segment as a recording of its own (positions of the segment), shifted and merged.
  (q,) = long.queries
  audio = long.frames[q.vid]
  pooled = []
  for start in train.segment_starts(len(audio), 32):
    piece = audio[start : start + 32].copy()
    piece[:, -2:] = np.stack([np.arange(32), np.arange(1, 33)], -1) / 32
    alone = Query(q.qid, "piece", 32.0, ((0.0, 1.0),))
    (found,) = train.predict(params, config.moments, {"piece": piece}, long.tokens, [alone], 1.0, mesh)
    pooled.append(np.array(found["pred_relevant_windows"]) + [start, start, 0])
  merged = train.merge_windows(np.concatenate(pooled), config.moments.train.segment_merge_iou, 4)
  np.testing.assert_allclose(predictions[0]["pred_relevant_windows"], merged, atol=1e-4)
  assert len({int(w[0] // 32) for w in np.concatenate(pooled)}) > 1  # The pool spans several segments.
