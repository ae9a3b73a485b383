"""Retrieval metrics against a brute-force float64 implementation of the SPEC 6 definitions, plus hand-made cases."""

import tracemalloc

import numpy as np
import pytest

from atr_jax import metrics as metrics_module
from atr_jax.metrics import format_metrics_table, retrieval_metrics, score_blocks


def brute_force_metrics(audio, text, text_to_audio):
  """Full similarity matrix and argsort; valid for inputs without ties (random float64)."""
  sim = text @ audio.T  # (N_t, N_a)
  t2a = np.array([1 + list(np.argsort(-sim[c])).index(text_to_audio[c]) for c in range(len(text))])
  a2t_best, a2t_ap, a2t_fraction = [], [], []
  for clip in range(len(audio)):
    relevant = set(np.flatnonzero(text_to_audio == clip))
    if not relevant:
      continue
    ranked = list(np.argsort(-sim[:, clip]))
    positions = sorted(1 + ranked.index(c) for c in relevant)
    a2t_best.append(positions[0])
    a2t_ap.append(sum(j / p for j, p in enumerate(positions, start=1) if p <= 10) / len(relevant))
    a2t_fraction.append([sum(p <= k for p in positions) / len(relevant) for k in (1, 5, 10)])
  t2a_ap = [1.0 / r if r <= 10 else 0.0 for r in t2a]
  out = {}
  for direction, ranks, ap in (("t2a", t2a, t2a_ap), ("a2t", np.array(a2t_best), a2t_ap)):
    out.update(
      {
        f"{direction}_R1": np.mean(ranks <= 1),
        f"{direction}_R5": np.mean(ranks <= 5),
        f"{direction}_R10": np.mean(ranks <= 10),
        f"{direction}_mAP10": np.mean(ap),
        f"{direction}_medR": np.median(ranks),
        f"{direction}_meanR": np.mean(ranks),
      }
    )
  out.update({f"a2t_fR{k}": value for k, value in zip((1, 5, 10), np.mean(a2t_fraction, axis=0))})
  return out


def random_retrieval_set(seed, n_audio=60, dim=12):
  """Clips with 0..6 captions, caption rows shuffled; embeddings correlated with their clip so ranks spread."""
  rng = np.random.default_rng(seed)
  audio = rng.normal(size=(n_audio, dim))
  captions_per_clip = rng.integers(0, 7, size=n_audio)
  captions_per_clip[:3] = [0, 1, 6]
  text_to_audio = rng.permutation(np.repeat(np.arange(n_audio), captions_per_clip))
  text = 0.4 * audio[text_to_audio] + rng.normal(size=(len(text_to_audio), dim))
  normalise = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
  return normalise(audio), normalise(text), text_to_audio


@pytest.mark.parametrize("block_size", [1, 4, 7, None])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force(seed, block_size):
  audio, text, text_to_audio = random_retrieval_set(seed)
  expected = brute_force_metrics(audio, text, text_to_audio)
  got = retrieval_metrics(audio, text, text_to_audio, block_size=block_size)
  assert set(got) == set(expected)
  assert all(type(v) is float for v in got.values())
  for key, value in expected.items():
    assert got[key] == pytest.approx(value, abs=1e-12), key
  assert 0.05 < got["t2a_R10"] < 0.95 and 0.05 < got["a2t_mAP10"] < 0.95  # not a degenerate case
  assert 0.05 < got["a2t_fR5"] < got["a2t_R5"] < 1.0  # fraction recall differs from "any hit" recall


def test_float32_input_agrees_with_float64():
  audio, text, text_to_audio = random_retrieval_set(seed=3)
  expected = brute_force_metrics(audio, text, text_to_audio)
  got = retrieval_metrics(audio.astype(np.float32), text.astype(np.float32), text_to_audio, block_size=5)
  for key, value in expected.items():
    assert got[key] == pytest.approx(value, abs=0.02), key


def test_hand_checked_example():
  # 3 clips along the axes; captions placed so every rank is known by hand.
  audio = np.eye(3)
  text = np.array(
    [
      [0.9, 0.3, 0.1],  # caption 0 of clip 0: clip scores (0.9, 0.3, 0.1) -> t2a rank 1
      [0.2, 0.5, 0.8],  # caption 1 of clip 0: (0.2, 0.5, 0.8) -> rank 3
      [0.1, 0.7, 0.6],  # caption 2 of clip 1: (0.1, 0.7, 0.6) -> rank 1
      [0.4, 0.3, 0.35],  # caption 3 of clip 2: (0.4, 0.3, 0.35) -> rank 2
    ]
  )
  text_to_audio = np.array([0, 0, 1, 2])
  # a2t: clip 0 scores captions (0.9, 0.2, 0.1, 0.4): its captions 0, 1 sit at positions 1 and 3 -> AP (1/1 + 2/3)/2
  #      clip 1 scores (0.3, 0.5, 0.7, 0.3): caption 2 at position 1
  #      clip 2 scores (0.1, 0.8, 0.6, 0.35): caption 3 at position 3
  m = retrieval_metrics(audio, text, text_to_audio)
  assert m["t2a_R1"] == 0.5 and m["t2a_R5"] == 1.0
  assert m["t2a_mAP10"] == pytest.approx((1 + 1 / 3 + 1 + 1 / 2) / 4)
  assert m["t2a_medR"] == 1.5 and m["t2a_meanR"] == pytest.approx(7 / 4)
  assert m["a2t_R1"] == pytest.approx(2 / 3) and m["a2t_R5"] == 1.0
  assert m["a2t_mAP10"] == pytest.approx(((1 + 2 / 3) / 2 + 1 + 1 / 3) / 3)
  assert m["a2t_medR"] == 1.0 and m["a2t_meanR"] == pytest.approx(5 / 3)


def test_ties_count_against_the_query():
  # Integer embeddings: every score is exact, so the ties are exact.
  audio = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # clips 0 and 1 identical
  text = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
  text_to_audio = np.array([1, 0, 2, 2])
  m = retrieval_metrics(audio, text, text_to_audio, block_size=2)
  # t2a: captions 0 and 1 tie between clips 0 and 1 -> rank 2 each; captions 2 and 3 -> rank 1.
  assert m["t2a_R1"] == 0.5 and m["t2a_meanR"] == 1.5
  # a2t: clip 0 ties its caption 1 with caption 0 (of clip 1) -> position 2; same for clip 1 -> position 2.
  # Clip 2 has two relevant captions tied with each other at the top: positions 1 and 2 (no penalty).
  assert m["a2t_R1"] == pytest.approx(1 / 3)
  assert m["a2t_meanR"] == pytest.approx(5 / 3)
  assert m["a2t_mAP10"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)


def test_clips_without_captions_are_left_out_of_a2t_but_compete_in_t2a():
  audio = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
  text = np.array([[1.0, 0.0], [0.0, 1.0]])
  with_extra = retrieval_metrics(audio, text, np.array([0, 1]))
  without = retrieval_metrics(audio[:2], text, np.array([0, 1]))
  assert without["t2a_meanR"] == 1.0 and with_extra["t2a_meanR"] == 1.0
  assert with_extra["a2t_R1"] == without["a2t_R1"] == 1.0  # the captionless clip 2 is not counted as a miss
  distractor = retrieval_metrics(np.array([[1.0, 0.0], [0.0, 1.0], [0.99, 0.1]]), text, np.array([2, 1]))
  assert distractor["t2a_R1"] == 0.5  # caption 0 now belongs to clip 2, beaten by clip 0


def test_bad_inputs_are_rejected():
  audio, text, owner = np.ones((3, 4)), np.ones((5, 4)), np.array([0, 1, 2, 0, 1])
  with pytest.raises(ValueError, match="different dimensions"):
    retrieval_metrics(audio, np.ones((5, 3)), owner)
  with pytest.raises(ValueError, match="text_emb must be a non-empty"):
    retrieval_metrics(audio, np.ones(5), owner)
  with pytest.raises(ValueError, match="shape \\(5,\\)"):
    retrieval_metrics(audio, text, owner[:4])
  with pytest.raises(ValueError, match="outside \\[0, 3\\)"):
    retrieval_metrics(audio, text, np.array([0, 1, 2, 3, 1]))
  with pytest.raises(ValueError, match="integer"):
    retrieval_metrics(audio, text, owner.astype(float))
  with pytest.raises(ValueError, match="NaN"):
    retrieval_metrics(np.full((3, 4), np.nan), text, owner)
  with pytest.raises(ValueError, match="block_size"):
    retrieval_metrics(audio, text, owner, block_size=0)


def test_format_metrics_table():
  audio, text, text_to_audio = random_retrieval_set(seed=4)
  metrics = retrieval_metrics(audio, text, text_to_audio)
  lines = format_metrics_table(metrics).splitlines()
  assert lines[0].split() == ["R@1", "R@5", "R@10", "mAP@10", "medR", "meanR"]
  assert lines[1].split()[0] == "t2a" and float(lines[1].split()[1]) == pytest.approx(metrics["t2a_R1"], abs=1e-4)
  assert lines[2].split()[0] == "a2t" and float(lines[2].split()[4]) == pytest.approx(metrics["a2t_mAP10"], abs=1e-4)
  assert len({len(line) for line in lines}) == 1  # aligned
  with pytest.raises(ValueError, match="a2t_R1"):
    format_metrics_table({k: v for k, v in metrics.items() if k != "a2t_R1"})


def test_fraction_recall_by_hand():
  # Clip 0 has 3 captions at positions 1, 2 and 4 (caption 3 of clip 1 sits at position 3); clip 1's caption is 1st.
  audio = np.eye(2)
  text = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.5, 0.4]])
  m = retrieval_metrics(audio, text, np.array([0, 0, 0, 1]))
  # clip 0 scores captions (0.9, 0.8, 0.3, 0.5): its captions 0, 1, 2 at positions 1, 2, 4 -> fR1 1/3, fR5 1
  # clip 1 scores (0.1, 0.2, 0.7, 0.4): its caption 3 at position 2 -> fR1 0, fR5 1
  assert m["a2t_fR1"] == pytest.approx((1 / 3 + 0) / 2)
  assert m["a2t_fR5"] == m["a2t_fR10"] == 1.0
  assert m["a2t_R1"] == 0.5


def test_memory_stays_within_a_block(monkeypatch):
  """With 1 MB blocks, scoring 20,000 captions x 4,000 clips (a 320 MB score matrix) stays far below its size."""
  monkeypatch.setattr(metrics_module, "_BLOCK_BYTES", 2**20)
  rng = np.random.default_rng(7)
  audio = rng.standard_normal((4000, 8), dtype=np.float32)
  text_to_audio = rng.permutation(np.repeat(np.arange(4000), 5))
  text = audio[text_to_audio] + rng.standard_normal((20000, 8), dtype=np.float32)
  assert all(scores.nbytes <= 2**20 for _, scores in score_blocks(text, audio))
  tracemalloc.start()
  retrieval_metrics(audio, text, text_to_audio)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert peak < 16 * 2**20, peak


def test_score_blocks_cover_every_query_row_once():
  rng = np.random.default_rng(8)
  queries, candidates = rng.normal(size=(11, 3)), rng.normal(size=(5, 3))
  order = rng.permutation(11)[:9]
  blocks = list(score_blocks(queries, candidates, block_size=4, query_rows=order))
  assert [b.stop - b.start for b, _ in blocks] == [4, 4, 1]
  np.testing.assert_allclose(np.concatenate([scores for _, scores in blocks]), queries[order] @ candidates.T)
