"""Retrieval metrics (SPEC section 6): text-to-audio and audio-to-text recall, mAP@10 and ranks, computed in blocks.

Similarity is the dot product of the given embeddings (they arrive L2-normalised: dot product = cosine). The full
caption x clip score matrix is never held: scores are computed one block of query rows at a time (float32 matmul,
float64 when an input is float64), so memory is O(block_size x number of candidates).

Conventions (both directions):
- Ranks are 1-based. Ties are broken against the query (pessimistic): a non-relevant candidate whose score EQUALS a
  relevant one's counts as ranked above it. With one relevant candidate (t2a) this is
  rank = #(candidates with score >= true score). Among several relevant candidates (a2t) ties between relevant
  candidates themselves do not matter: the j-th best relevant caption sits at position
  p_j = j + #(non-relevant captions with score >= its score).
- t2a: each caption queries all clips; r = rank of its clip. R@k = mean(r <= k), mAP@10 = mean(1/r if r <= 10 else 0)
  (the official DCASE ranking metric), medR / meanR over r.
- a2t: each clip queries all captions; its relevant captions are those whose entry in ``text_to_audio`` is the clip
  (any number, in any row order). R@k counts "any hit": best = p_1 <= k. mAP@10 = mean over clips of
  sum_{j: p_j <= 10} (j / p_j) / (number of relevant captions). medR / meanR over p_1. DCASE's fraction-style
  recall fR@k = mean over clips of #{j: p_j <= k} / (number of relevant captions). Clips without any caption have
  nothing to retrieve and are left out of the a2t means (they still compete as candidates in t2a).

Cost: the two score products (captions x clips for t2a, clips x captions for a2t, each in row blocks by BLAS) plus
one comparison pass per block for t2a and one per relevant-caption slot for a2t; ``score_blocks`` is the bare
product loop (the floor that scripts/benchmark_eval.py compares against). ``relevant_positions`` and
``average_precision_at`` (positions and AP@k of several relevant candidates per query) also serve the graded t2a
metrics of ``atr_jax.relevance``.
"""

from __future__ import annotations

import numpy as np

METRIC_COLUMNS = (
  ("R1", "R@1"),
  ("R5", "R@5"),
  ("R10", "R@10"),
  ("mAP10", "mAP@10"),
  ("medR", "medR"),
  ("meanR", "meanR"),
)
DIRECTIONS = ("t2a", "a2t")
_RANK_KEYS = ("medR", "meanR")
FRACTION_RECALL_KS = (1, 5, 10)  # a2t_fR{k}: DCASE fraction-style audio-to-text recall
_BLOCK_BYTES = 64 * 2**20  # target size of one block of scores


def retrieval_metrics(audio_emb, text_emb, text_to_audio, block_size: int | None = None) -> dict[str, float]:
  """t2a and a2t retrieval metrics of clip embeddings [N_a, D] and caption embeddings [N_t, D].

  ``text_to_audio[i]`` is the row of ``audio_emb`` holding caption i's clip. ``block_size`` is the number of query
  rows scored at once (default: as many as fit in ~64 MB of scores). Returns python floats keyed
  ``{t2a,a2t}_{R1,R5,R10,mAP10,medR,meanR}`` and ``a2t_{fR1,fR5,fR10}``.
  """
  audio, text, owner = _validated(audio_emb, text_emb, text_to_audio)
  if block_size is not None and (not isinstance(block_size, (int, np.integer)) or block_size < 1):
    raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}")
  t2a_rank = _text_to_audio_ranks(audio, text, owner, block_size)
  t2a_ap = np.where(t2a_rank <= 10, 1.0 / t2a_rank, 0.0)
  a2t_best, a2t_ap, a2t_fraction_recall = _audio_to_text_ranks(audio, text, owner, block_size)
  return {
    **_summary("t2a", t2a_rank, t2a_ap),
    **_summary("a2t", a2t_best, a2t_ap),
    **{f"a2t_fR{k}": float(np.mean(recall)) for k, recall in zip(FRACTION_RECALL_KS, a2t_fraction_recall)},
  }


def score_blocks(
  queries: np.ndarray, candidates: np.ndarray, block_size: int | None = None, query_rows: np.ndarray | None = None
):
  """Yields (slice of query positions, scores [b, N_candidates]) for consecutive blocks of query rows.

  ``query_rows`` (optional) selects and orders the rows of ``queries`` without copying them all; a block holds
  ``block_size`` rows (default: ~64 MB of scores).
  """
  n_queries = queries.shape[0] if query_rows is None else query_rows.size
  rows = block_size if block_size is not None else max(1, _BLOCK_BYTES // (candidates.shape[0] * queries.itemsize))
  for start in range(0, n_queries, rows):
    block = slice(start, min(start + rows, n_queries))
    block_queries = queries[block] if query_rows is None else queries[query_rows[block]]
    yield block, block_queries @ candidates.T


def format_metrics_table(metrics: dict[str, float]) -> str:
  """A small aligned text table: one row per direction (t2a, a2t), columns R@1 R@5 R@10 mAP@10 medR meanR."""
  missing = [f"{d}_{key}" for d in DIRECTIONS for key, _ in METRIC_COLUMNS if f"{d}_{key}" not in metrics]
  if missing:
    raise ValueError(f"format_metrics_table: metrics lack the keys {missing}")
  lines = ["     " + "".join(f"{title:>9}" for _, title in METRIC_COLUMNS)]
  for d in DIRECTIONS:
    cells = [
      f"{metrics[f'{d}_{key}']:9.1f}" if key in _RANK_KEYS else f"{metrics[f'{d}_{key}']:9.4f}"
      for key, _ in METRIC_COLUMNS
    ]
    lines.append(f"{d:<5}" + "".join(cells))
  return "\n".join(lines)


def _validated(audio_emb, text_emb, text_to_audio) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  audio, text, owner = np.asarray(audio_emb), np.asarray(text_emb), np.asarray(text_to_audio)
  for name, x in (("audio_emb", audio), ("text_emb", text)):
    if x.ndim != 2 or x.shape[0] == 0:
      raise ValueError(f"{name} must be a non-empty [N, D] array, got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16"):
      raise ValueError(f"{name} must hold floating point values, got dtype {x.dtype}")
  if audio.shape[1] != text.shape[1]:
    raise ValueError(f"audio_emb and text_emb have different dimensions: {audio.shape[1]} vs {text.shape[1]}")
  if owner.shape != (text.shape[0],):
    raise ValueError(
      f"text_to_audio must have shape ({text.shape[0]},) (one clip index per caption), got {owner.shape}"
    )
  if not np.issubdtype(owner.dtype, np.integer):
    raise ValueError(f"text_to_audio must hold integer clip indices, got dtype {owner.dtype}")
  if owner.min() < 0 or owner.max() >= audio.shape[0]:
    raise ValueError(
      f"text_to_audio has clip indices outside [0, {audio.shape[0]}): min {owner.min()}, max {owner.max()}"
    )
  dtype = np.float64 if np.float64 in (audio.dtype, text.dtype) else np.float32
  audio, text = audio.astype(dtype, copy=False), text.astype(dtype, copy=False)
  for name, x in (("audio_emb", audio), ("text_emb", text)):
    rows = max(1, _BLOCK_BYTES // (x.shape[1] * x.itemsize))  # checked in blocks: no full-size temporary
    if not all(np.isfinite(x[start : start + rows]).all() for start in range(0, x.shape[0], rows)):
      raise ValueError(f"{name} holds NaN or infinite values")
  return audio, text, owner.astype(np.int64, copy=False)


def _text_to_audio_ranks(audio: np.ndarray, text: np.ndarray, owner: np.ndarray, block_size: int | None) -> np.ndarray:
  """Pessimistic 1-based rank of each caption's clip among all clips."""
  ranks = np.empty(text.shape[0], np.int64)
  for block, scores in score_blocks(text, audio, block_size):  # (b, N_a)
    true = scores[np.arange(scores.shape[0]), owner[block]]
    ranks[block] = np.count_nonzero(scores >= true[:, None], axis=1)
  return ranks


def _captions_by_clip(owner: np.ndarray, n_audio: int) -> tuple[np.ndarray, np.ndarray]:
  """Clips with at least one caption [M], and their caption rows [M, K_max] padded with -1."""
  counts = np.bincount(owner, minlength=n_audio)
  clips = np.flatnonzero(counts)
  order = np.argsort(owner, kind="stable")
  sorted_owner = owner[order]
  slot = np.arange(owner.size) - (np.cumsum(counts) - counts)[sorted_owner]
  table = np.full((clips.size, counts.max()), -1, np.int64)
  table[np.searchsorted(clips, sorted_owner), slot] = order
  return clips, table


def _audio_to_text_ranks(
  audio: np.ndarray, text: np.ndarray, owner: np.ndarray, block_size: int | None
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
  """Per clip with captions: best position p_1, average precision over the top 10 and the fraction recalls at
  FRACTION_RECALL_KS (see module docstring)."""
  clips, table = _captions_by_clip(owner, audio.shape[0])
  n_relevant = np.count_nonzero(table >= 0, axis=1)
  is_relevant = np.arange(1, table.shape[1] + 1)[None, :] <= n_relevant[:, None]  # valid slots of relevant_positions
  best = np.empty(clips.size, np.int64)
  average_precision = np.empty(clips.size, np.float64)
  fraction_recall = [np.empty(clips.size, np.float64) for _ in FRACTION_RECALL_KS]
  for block, scores in score_blocks(audio, text, block_size, query_rows=clips):  # (b, N_t)
    position = relevant_positions(scores, table[block])
    best[block] = position[:, 0]
    average_precision[block] = average_precision_at(position, n_relevant[block], 10)
    for k, recall in zip(FRACTION_RECALL_KS, fraction_recall):
      recall[block] = np.count_nonzero(is_relevant[block] & (position <= k), axis=1) / n_relevant[block]
  return best, average_precision, fraction_recall


def relevant_positions(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
  """Pessimistic 1-based positions p_j [b, K] of the relevant candidates of each query row of ``scores`` [b, N].

  ``relevant`` [b, K] holds each query's relevant candidate indices, padded with -1 (any order); column j of the
  result is the position of the (j+1)-th best relevant candidate (see module docstring), padding slots last (their
  values are meaningless).
  """
  values = np.take_along_axis(scores, np.maximum(relevant, 0), axis=1)
  values = -np.sort(-np.where(relevant >= 0, values, -np.inf), axis=1)  # descending, padding last
  at_or_above = np.stack([np.count_nonzero(scores >= values[:, j, None], axis=1) for j in range(values.shape[1])], 1)
  relevant_at_or_above = (values[:, None, :] >= values[:, :, None]).sum(axis=2)
  return np.arange(1, values.shape[1] + 1) + at_or_above - relevant_at_or_above


def average_precision_at(position: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
  """AP@k [b] = sum_{j <= n_relevant, p_j <= k} (j / p_j) / n_relevant of positions [b, K] from
  ``relevant_positions`` (slots past a query's n_relevant are padding)."""
  hit_number = np.arange(1, position.shape[1] + 1)  # j
  counted = (hit_number[None, :] <= n_relevant[:, None]) & (position <= k)
  return np.where(counted, hit_number / position, 0.0).sum(axis=1) / n_relevant


def _summary(direction: str, ranks: np.ndarray, average_precision: np.ndarray) -> dict[str, float]:
  return {
    f"{direction}_R1": float(np.mean(ranks <= 1)),
    f"{direction}_R5": float(np.mean(ranks <= 5)),
    f"{direction}_R10": float(np.mean(ranks <= 10)),
    f"{direction}_mAP10": float(np.mean(average_precision)),
    f"{direction}_medR": float(np.median(ranks)),
    f"{direction}_meanR": float(np.mean(ranks)),
  }
