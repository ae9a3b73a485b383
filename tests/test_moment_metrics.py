"""Moment-retrieval metrics (atr_jax.moments.metrics) against hand-computed cases and an independent float64
reference of lighthouse's standalone_eval definitions written here."""

import numpy as np
import pytest

from atr_jax.moments import metrics


def _reference_iou(a, b):
  inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
  return inter / ((a[1] - a[0]) + (b[1] - b[0]) - inter)


def _reference_ap(preds, gts, threshold):
  """Detection AP with greedy one-to-one matching: area under the interpolated precision-recall curve."""
  ranked = sorted(enumerate(preds[:10]), key=lambda item: (-item[1][2], item[0]))  # Stable on score.
  used = set()
  tps = []
  for _, p in ranked:
    # Candidates by IoU, highest first; equal IoUs: the higher index first.
    candidates = sorted(range(len(gts)), key=lambda g: (_reference_iou(p, gts[g]), g), reverse=True)
    hit = False
    for g in candidates:
      iou = _reference_iou(p, gts[g])
      if iou < threshold:
        break
      if g in used:
        continue
      used.add(g)
      hit = True
      break
    tps.append(hit)
  points = []  # (recall, precision) at each rank.
  found = 0
  for rank, hit in enumerate(tps, 1):
    found += hit
    points.append((found / len(gts), found / rank))
  # AP = sum over recall increments of the best precision at any recall >= that level.
  ap, previous_recall = 0.0, 0.0
  for recall, _ in points:
    if recall > previous_recall:
      ap += (recall - previous_recall) * max(p for r, p in points if r >= recall)
      previous_recall = recall
  return ap


def _reference(predictions, ground_truth):
  gt = {d["qid"]: d["relevant_windows"] for d in ground_truth}
  thresholds = [0.5 + 0.05 * i for i in range(10)]
  thresholds = [float(f"{t:.2f}") for t in thresholds]
  ap = np.zeros((len(predictions), 10))
  r1 = np.zeros((len(predictions), 2))
  for q, d in enumerate(predictions):
    windows = gt[d["qid"]]
    for t, threshold in enumerate(thresholds):
      ap[q, t] = _reference_ap(d["pred_relevant_windows"], windows, threshold)
    best = max(_reference_iou(d["pred_relevant_windows"][0], w) for w in windows)
    r1[q] = [best >= 0.5, best >= 0.7]
  per_threshold = ap.mean(0)
  raw = {
    "R1@0.5": r1[:, 0].mean(),
    "R1@0.7": r1[:, 1].mean(),
    "mAP": per_threshold.mean(),
    "mAP@0.5": per_threshold[0],
    "mAP@0.75": per_threshold[5],
  }
  return {k: 100 * v for k, v in raw.items()}


def _case(gt_windows, pred_windows, qid="q"):
  return [{"qid": qid, "pred_relevant_windows": pred_windows}], [
    {"qid": qid, "duration": 60, "relevant_windows": gt_windows}
  ]


@pytest.mark.parametrize(
  "gt, pred, expected",
  [
    # A perfect single prediction.
    ([[0, 10]], [[0, 10, 0.9]], dict(R1_5=100, R1_7=100, mAP=100, mAP5=100, mAP75=100)),
    # IoU exactly 0.7: a hit at 0.5..0.70 (5 of the 10 thresholds), a miss at 0.75.
    ([[0, 10]], [[0, 7, 0.9]], dict(R1_5=100, R1_7=100, mAP=50, mAP5=100, mAP75=0)),
    # R1 takes the first listed window; AP ranks by score: both GT windows found at ranks 1-2, then a false positive.
    (
      [[0, 10], [20, 30]],
      [[20, 30, 0.5], [0, 10, 0.9], [50, 60, 0.1]],
      dict(R1_5=100, R1_7=100, mAP=100, mAP5=100, mAP75=100),
    ),
    # R1 takes the first listed window (a miss) although the higher-scored hit is listed second.
    ([[0, 10]], [[30, 40, 0.2], [0, 10, 0.9]], dict(R1_5=0, R1_7=0, mAP=100, mAP5=100, mAP75=100)),
    # A duplicate: the GT window is matched once, the second copy is a false positive after full recall (AP 1).
    ([[0, 10]], [[0, 10, 0.9], [0, 10, 0.8]], dict(R1_5=100, R1_7=100, mAP=100, mAP5=100, mAP75=100)),
    # A false positive ranked first: precision 1/2 at full recall.
    ([[0, 10]], [[0, 10, 0.8], [30, 40, 0.9]], dict(R1_5=100, R1_7=100, mAP=50, mAP5=50, mAP75=50)),
    # Two GT windows, one found: recall 1/2 at precision 1.
    ([[0, 10], [20, 30]], [[0, 10, 0.9]], dict(R1_5=100, R1_7=100, mAP=50, mAP5=50, mAP75=50)),
    # Only the first 10 listed predictions count: the 11th (the best score, the only hit) is dropped.
    ([[0, 10]], [[40, 41, 0.1]] * 10 + [[0, 10, 0.99]], dict(R1_5=0, R1_7=0, mAP=0, mAP5=0, mAP75=0)),
    # Equal IoUs (0.5 with both windows): the first prediction takes the later window, so the second (IoU 1 with it,
    # 0 with the other) is a false positive at 0.5; above 0.5 the first misses and the second hits at rank 2.
    ([[0, 10], [10, 20]], [[0, 20, 0.9], [10, 20, 0.8]], dict(R1_5=100, R1_7=0, mAP=27.5, mAP5=50, mAP75=25)),
    # Equal scores keep list order: the miss listed first ranks first (precision 1/2 at full recall).
    ([[0, 10]], [[30, 40, 0.5], [0, 10, 0.5]], dict(R1_5=0, R1_7=0, mAP=50, mAP5=50, mAP75=50)),
  ],
)
def test_hand_cases(gt, pred, expected):
  predictions, ground_truth = _case(gt, pred)
  result = metrics.evaluate(predictions, ground_truth)
  names = dict(R1_5="R1@0.5", R1_7="R1@0.7", mAP="mAP", mAP5="mAP@0.5", mAP75="mAP@0.75")
  assert result == {names[k]: float(v) for k, v in expected.items()}


def test_a_taken_window_is_skipped_for_the_next_best():
  """The second prediction overlaps window A best (taken) and window B enough: it takes B."""
  gt = [[0, 10], [4, 14]]
  pred = [[0, 10, 0.9], [1, 11, 0.8]]  # IoU([1, 11], A) = 9/11, IoU([1, 11], B) = 7/13 > 0.5.
  result = metrics.evaluate(*_case(gt, pred))
  assert result["mAP@0.5"] == 100.0
  # At 0.75 the second prediction's only candidate above threshold (A) is taken: recall stays 1/2.
  assert result["mAP@0.75"] == 50.0


@pytest.mark.parametrize("seed", range(3))
def test_random_cases_match_the_reference(seed):
  rng = np.random.default_rng(seed)
  predictions, ground_truth = [], []
  for q in range(60):
    duration = 60.0
    gts = []
    for _ in range(rng.integers(1, 6)):
      start = rng.uniform(0, 50)
      gts.append([start, start + rng.uniform(1, 10)])
    if q % 3 == 0:  # Integer windows: IoU ties between predictions and windows happen.
      gts = [[float(np.floor(s)), float(np.floor(e)) + 1] for s, e in gts]
    preds = []
    for _ in range(rng.integers(1, 14)):
      if gts and rng.random() < 0.6:  # Near a GT window.
        s, e = gts[rng.integers(len(gts))]
        s, e = s + rng.normal(0, 1.5), e + rng.normal(0, 1.5)
        s, e = min(s, e - 0.1), max(e, s + 0.1)
      else:
        s = rng.uniform(0, 55)
        e = s + rng.uniform(0.5, 8)
      if q % 3 == 0:
        s, e = float(np.round(s)), float(np.round(s) + max(1, np.round(e - s)))
      score = float(np.round(rng.random(), 1))  # Coarse scores: ties in rank.
      preds.append([float(s), float(e), score])
    predictions.append({"qid": f"q{q}", "pred_relevant_windows": preds})
    ground_truth.append({"qid": f"q{q}", "duration": duration, "relevant_windows": gts})
  result = metrics.evaluate(predictions, ground_truth)
  reference = _reference(predictions, ground_truth)
  assert set(result) == set(reference)
  for name, value in reference.items():
    assert result[name] == pytest.approx(value, abs=0.005 + 1e-9), name  # Only the 2-decimal rounding apart.
  assert 0 < result["mAP"] < 100


def test_windows_outside_the_full_range_are_dropped_and_a_query_left_without_any_is_left_out():
  """standalone_eval's "full" range keeps windows with 0 < length <= 1500 s and drops queries left with none."""
  rng = np.random.default_rng(7)
  good = []
  for i in range(4):
    starts = rng.uniform(0, 100, 2)
    good.append({"qid": f"q{i}", "duration": 120, "relevant_windows": [[s, s + rng.uniform(1, 10)] for s in starts]})
  predictions = [
    {
      "qid": d["qid"],
      "pred_relevant_windows": [[s, s + rng.uniform(1, 10), rng.uniform()] for s in rng.uniform(0, 100, 5)],
    }
    for d in good
  ]
  predictions[0]["pred_relevant_windows"][0] = [50.0, 50.0 + 1e-9, 0.9]  # Would hit the zero-length window below.
  degenerate = [
    dict(d, relevant_windows=d["relevant_windows"] + [[50.0, 50.0], [9.0, 3.0], [0.0, 1600.0]]) for d in good
  ]
  only_bad = {"qid": "bad", "duration": 5000, "relevant_windows": [[299.0, 299.0], [10.0, 4000.0]]}
  bad_prediction = {"qid": "bad", "pred_relevant_windows": [[10.0, 4000.0, 1.0]]}
  expected = metrics.evaluate(predictions, good)
  assert metrics.evaluate(predictions + [bad_prediction], degenerate + [only_bad]) == expected
  assert expected == pytest.approx(_reference(predictions, good), abs=0.006)
  with pytest.raises(ValueError, match="no ground-truth window"):
    metrics.evaluate([bad_prediction], [only_bad])


def test_mismatched_qids_are_an_error():
  predictions, ground_truth = _case([[0, 1]], [[0, 1, 1.0]])
  with pytest.raises(ValueError, match="different qids"):
    metrics.evaluate(predictions, ground_truth + [{"qid": "other", "duration": 5, "relevant_windows": [[0, 1]]}])
  with pytest.raises(ValueError, match="pred_relevant_windows"):
    metrics.evaluate([{"qid": "q", "pred_relevant_windows": []}], ground_truth)
