"""The zero-training moment baseline (SPEC 12, issue 28 item 4): sliding-window retrieval with the dual encoder.

Each frame's score is the cosine of its audio embedding (the frame feature's first D columns, unit rows from
`atr_jax.moments.features`) with the query's sentence embedding from the same workdir (`atr_jax.load(...).embed_text`).
Every window of `moments.sliding_window.window_frames` frames (at every start) is scored by the contrast
mean(scores inside) - mean(scores outside) (the whole-recording window: its inside mean), so a window is rewarded for
covering the high-scoring frames and penalised for covering low ones, whatever its length. Windows are taken best
first, a window lying mostly inside a kept one (their intersection at least `merge_overlap` of its own length: a part
of a better moment, or the same moment shifted) is merged into it (dropped), and the best `num_windows` are the
query's ranked moments [start, end, score] in seconds (the end clamped to the duration).
"""

import numpy as np


def window_scores(frame_scores: np.ndarray, window_frames) -> np.ndarray:
  """(K, 3) [first frame, end frame (exclusive), contrast score] of every window of the given lengths."""
  total, count = float(np.sum(frame_scores)), len(frame_scores)
  cumulative = np.concatenate([[0.0], np.cumsum(frame_scores, dtype=np.float64)])
  rows = []
  for length in sorted({min(int(n), count) for n in window_frames}):
    first = np.arange(count - length + 1)
    inside = cumulative[first + length] - cumulative[first]
    outside = (total - inside) / (count - length) if length < count else 0.0
    rows.append(np.stack([first, first + length, inside / length - outside], -1))
  return np.concatenate(rows)


def covered(span: np.ndarray, others: np.ndarray) -> np.ndarray:
  """Share of `span` [start, end] inside each of `others` (K, 2)."""
  inside = np.minimum(span[1], others[:, 1]) - np.maximum(span[0], others[:, 0])
  return np.clip(inside, 0, None) / (span[1] - span[0])


def moments(frame_scores: np.ndarray, hop_s: float, duration: float, config) -> list[list[float]]:
  """Ranked [start, end, score] seconds of one query from its frames' scores (`config`: moments.sliding_window)."""
  candidates = window_scores(np.asarray(frame_scores, np.float64), config.window_frames)
  candidates = candidates[np.argsort(-candidates[:, 2], kind="stable")]
  spans = np.stack([candidates[:, 0] * hop_s, np.minimum(candidates[:, 1] * hop_s, duration)], -1)
  kept = []
  for span, score in zip(spans, candidates[:, 2]):
    if not kept or covered(span, np.array([k[:2] for k in kept])).max() < config.merge_overlap:
      kept.append([float(span[0]), float(span[1]), float(score)])
    if len(kept) == config.num_windows:
      break
  return kept


def predict(frames: dict, query_embeddings: dict, queries, hop_s: float, config) -> list[dict]:
  """Lighthouse-format predictions (`qid`, `vid`, `pred_relevant_windows`) of `queries` from their recordings'
  frame features `frames` {vid: (T, D + 2)} and sentence embeddings `query_embeddings` {qid: (D,)}."""
  predictions = []
  for q in queries:
    audio = np.asarray(frames[q.vid], np.float64)[:, :-2]  # The last two columns are positions.
    scores = audio @ np.asarray(query_embeddings[q.qid], np.float64)
    windows = moments(scores, hop_s, q.duration, config)
    predictions.append({"qid": q.qid, "vid": q.vid, "pred_relevant_windows": windows})
  return predictions
