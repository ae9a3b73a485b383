"""Moment-retrieval metrics as lighthouse's `standalone_eval` defines them (QVHighlights style, "full" range, SPEC 12).

Inputs are lighthouse-format lists: predictions `{"qid", "pred_relevant_windows": [[start, end, score], ...]}` and
ground truth `{"qid", "duration", "relevant_windows": [[start, end], ...]}`, the same set of qids on both sides.

- R1@t: the query's FIRST listed prediction (list order, not score order) against the ground-truth window with which
  it has the highest IoU; a hit when that IoU >= t. Mean over queries.
- AP@t (ActivityNet detection AP of one query): the first 10 listed predictions, stably sorted by decreasing score;
  each in turn takes the unmatched ground-truth window of highest IoU (ties: the later window) if that IoU >= t, else
  it is a false positive (a window already taken is skipped, the next-best tried); precision/recall over the ranks,
  positives = the number of ground-truth windows; VOC 2011 interpolation (precision made non-increasing, summed over
  the recall steps). mAP@t = mean over queries; mAP = mean of mAP@t over t in 0.50, 0.55, ..., 0.95.
- The "full" length range, as standalone_eval applies it: a ground-truth window counts only when 0 < its length <=
  1500 s (a zero-length, reversed or longer window is dropped), and a query left with none is left out of every
  metric (R1 and mAP alike).
- Every value in percent, rounded to 2 decimals as standalone_eval prints and stores them.
"""

import numpy as np

IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
MAX_PREDICTIONS = 10
METRIC_NAMES = ("R1@0.5", "R1@0.7", "mAP", "mAP@0.5", "mAP@0.75")
FULL_RANGE_S = (0.0, 1500.0)  # standalone_eval's "full" range: windows with min < length <= max are kept.


def _iou(windows: np.ndarray, others: np.ndarray) -> np.ndarray:
  """(N, M) IoU of [start, end] rows, union = sum of lengths - intersection."""
  left = np.maximum(windows[:, None, 0], others[None, :, 0])
  right = np.minimum(windows[:, None, 1], others[None, :, 1])
  intersection = np.clip(right - left, 0, None)
  union = (windows[:, 1] - windows[:, 0])[:, None] + (others[:, 1] - others[:, 0])[None, :] - intersection
  return intersection / union


def _average_precision(predictions: np.ndarray, ground_truth: np.ndarray) -> np.ndarray:
  """AP of one query at each IoU threshold: `predictions` (P, 3) [start, end, score], `ground_truth` (G, 2)."""
  order = np.argsort(-predictions[:, 2], kind="stable")
  ious = _iou(predictions[order, :2], ground_truth)  # (P, G)
  aps = np.zeros(len(IOU_THRESHOLDS))
  for t, threshold in enumerate(IOU_THRESHOLDS):
    taken = np.zeros(len(ground_truth), bool)
    hits = np.zeros(len(order))
    for p, row in enumerate(ious):
      for g in np.argsort(row, kind="stable")[::-1]:
        if row[g] < threshold:
          break
        if not taken[g]:
          taken[g], hits[p] = True, 1.0
          break
    true_positives = np.cumsum(hits)
    precision = true_positives / np.arange(1, len(hits) + 1)
    recall = true_positives / len(ground_truth)
    precision = np.concatenate([[0.0], precision, [0.0]])
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    aps[t] = np.sum((recall[steps] - recall[steps - 1]) * precision[steps])
  return aps


def _windows(value, width: int, what: str) -> np.ndarray:
  array = np.asarray(value, np.float64)
  if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] < width:
    raise ValueError(f"{what} must be a non-empty list of windows with at least {width} values each, got {value!r}")
  return array


def _in_full_range(windows: np.ndarray) -> np.ndarray:
  lengths = windows[:, 1] - windows[:, 0]
  return windows[(lengths > FULL_RANGE_S[0]) & (lengths <= FULL_RANGE_S[1])]


def evaluate(predictions: list[dict], ground_truth: list[dict]) -> dict[str, float]:
  """{"R1@0.5", "R1@0.7", "mAP", "mAP@0.5", "mAP@0.75"} in percent (see the module docstring)."""
  truth = {
    d["qid"]: _windows(d["relevant_windows"], 2, f"ground truth qid {d['qid']!r} relevant_windows")
    for d in ground_truth
  }
  predicted = {
    d["qid"]: _windows(d["pred_relevant_windows"], 3, f"prediction qid {d['qid']!r} pred_relevant_windows")
    for d in predictions
  }
  if len(truth) != len(ground_truth) or len(predicted) != len(predictions):
    raise ValueError("each qid must appear once in the predictions and once in the ground truth")
  if set(truth) != set(predicted):
    missing, extra = sorted(set(truth) - set(predicted), key=str), sorted(set(predicted) - set(truth), key=str)
    raise ValueError(f"predictions and ground truth name different qids: missing {missing[:5]}, extra {extra[:5]}")
  truth = {qid: kept for qid, kept in ((qid, _in_full_range(w)) for qid, w in truth.items()) if len(kept)}
  if not truth:
    raise ValueError(f"no ground-truth window is longer than {FULL_RANGE_S[0]} s and at most {FULL_RANGE_S[1]} s")
  aps, best_ious = [], []
  for qid, windows in truth.items():
    ranked = predicted[qid][:MAX_PREDICTIONS, :3]
    aps.append(_average_precision(ranked, windows[:, :2]))
    best_ious.append(_iou(ranked[:1, :2], windows[:, :2]).max())
  map_at = np.mean(aps, axis=0)
  best_ious = np.asarray(best_ious)
  values = {
    "R1@0.5": np.mean(best_ious >= 0.5),
    "R1@0.7": np.mean(best_ious >= 0.7),
    "mAP": np.mean(map_at),
    "mAP@0.5": map_at[IOU_THRESHOLDS.index(0.5)],
    "mAP@0.75": map_at[IOU_THRESHOLDS.index(0.75)],
  }
  return {name: float(f"{100 * values[name]:.2f}") for name in METRIC_NAMES}  # standalone_eval's rounding.
