"""Graded t2a mAP@k (SPEC 11) against a float64 loop over full argsorts, a hand-checked case, the DCASE 2025 CSV
format and the errors for tables that do not fit the evaluated captions and clips."""

import csv

import numpy as np
import pytest

from atr_jax.relevance import GRADED_KS, graded_metrics, read_relevance_csv


def reference_graded_map(similarity, query_texts, clip_names, relevance, k):
  """SPEC 11 written plainly: the i-th relevant clip in rank order at 0-based rank r adds i / (r + 1) if r < k; the
  sum is divided by the number of relevant clips, then averaged over the table's queries (valid without ties)."""
  total = 0.0
  for query, names in relevance.items():
    scores = np.asarray(similarity[query_texts.index(query)], np.float64)
    ranking = list(np.argsort(-scores))
    ranks = sorted(ranking.index(clip_names.index(name)) for name in names)
    total += sum(i / (rank + 1) for i, rank in enumerate(ranks, start=1) if rank < k) / len(ranks)
  return total / len(relevance)


def random_case(seed, n_queries, n_clips, max_relevant):
  """Captions (one repeated), clip names, a table over ~70% of the captions with 1..max_relevant clips each, and
  float64 scores where relevant clips tend to score higher (so ranks spread over the top 16 and beyond)."""
  rng = np.random.default_rng(seed)
  query_texts = [f"caption {i}" for i in range(n_queries)]
  query_texts[-1] = query_texts[0]  # a repeated caption: same text, same row of scores
  clip_names = [f"clip_{j:04d}.wav" for j in rng.permutation(n_clips)]
  similarity = rng.normal(size=(n_queries, n_clips))
  relevance = {}
  for row in rng.permutation(n_queries - 1)[: int(0.7 * n_queries)]:
    columns = rng.choice(n_clips, size=rng.integers(1, max_relevant + 1), replace=False)
    similarity[row, columns] += rng.uniform(0.0, 2.0, size=columns.size)
    relevance[query_texts[row]] = [clip_names[c] for c in columns]
  similarity[-1] = similarity[0]
  return similarity, query_texts, clip_names, relevance


@pytest.mark.parametrize(
  "seed, n_queries, n_clips, max_relevant", [(0, 6, 20, 3), (1, 40, 100, 25), (2, 150, 400, 8), (3, 30, 17, 17)]
)
def test_matches_float64_reference(seed, n_queries, n_clips, max_relevant):
  similarity, query_texts, clip_names, relevance = random_case(seed, n_queries, n_clips, max_relevant)
  got = graded_metrics(similarity, query_texts, clip_names, relevance)
  assert set(got) == {f"t2a_mAP{k}_graded" for k in GRADED_KS} == {"t2a_mAP10_graded", "t2a_mAP16_graded"}
  for k in GRADED_KS:
    expected = reference_graded_map(similarity, query_texts, clip_names, relevance, k)
    assert type(got[f"t2a_mAP{k}_graded"]) is float
    assert got[f"t2a_mAP{k}_graded"] == pytest.approx(expected, abs=1e-12), k
  assert 0.0 < got["t2a_mAP10_graded"] < got["t2a_mAP16_graded"] < 1.0  # not a degenerate case
  float32 = graded_metrics(similarity.astype(np.float32), query_texts, clip_names, relevance)
  assert float32["t2a_mAP16_graded"] == pytest.approx(got["t2a_mAP16_graded"], abs=0.02)


def scores_in_order(order, n_clips):
  """A row of scores that ranks the clips as listed in ``order`` (best first)."""
  scores = np.empty(n_clips)
  scores[order] = np.arange(n_clips, 0, -1) / n_clips
  return scores


def test_hand_checked_example():
  clip_names = [f"c{j}.wav" for j in range(12)]
  query_texts = ["a dog barks", "rain falls", "not in the table"]
  similarity = np.stack(
    [
      scores_in_order([3, 0, 1, 2, 4, 6, 7, 8, 9, 10, 5, 11], 12),  # relevant c3, c1, c5 at 1-based positions 1, 3, 11
      scores_in_order(list(range(12)), 12),  # relevant c11 at position 12
      scores_in_order(list(range(12)), 12),
    ]
  )
  relevance = {"a dog barks": ["c5.wav", "c1.wav", "c3.wav"], "rain falls": ["c11.wav"]}
  got = graded_metrics(similarity, query_texts, clip_names, relevance)
  # "a dog barks": AP@10 = (1/1 + 2/3) / 3, AP@16 = (1/1 + 2/3 + 3/11) / 3; "rain falls": AP@10 = 0, AP@16 = 1/12.
  assert got["t2a_mAP10_graded"] == pytest.approx(((1 + 2 / 3) / 3 + 0) / 2)
  assert got["t2a_mAP16_graded"] == pytest.approx(((1 + 2 / 3 + 3 / 11) / 3 + 1 / 12) / 2)


def test_ties_count_against_the_query():
  # Relevant c0 ties with c1 at the top: position 2 (as atr_jax.metrics); two relevant clips tied with each other
  # at the top keep positions 1 and 2.
  similarity = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
  got = graded_metrics(similarity, ["q0", "q1"], ["c0", "c1", "c2"], {"q0": ["c0"], "q1": ["c0", "c1"]})
  assert got["t2a_mAP10_graded"] == pytest.approx((1 / 2 + (1 + 2 / 2) / 2) / 2)


def write_csv(path, rows, header=("query", "audio_filenames")):
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def test_csv_round_trip(tmp_path):
  """The DCASE 2025 layout: one row per query, its files as a Python list literal (quoted by the CSV writer)."""
  relevance = {
    'a "loud" dog, barking': ("it's here.wav", "b, with comma.wav"),
    "rain on a roof": ("rain.wav",),
  }
  path = tmp_path / "metadata_eval.csv"
  write_csv(path, [[query, str(list(names))] for query, names in relevance.items()])
  assert read_relevance_csv(str(path)) == relevance
  clip_names = ["rain.wav", "it's here.wav", "other.wav", "b, with comma.wav"]
  similarity = np.random.default_rng(0).normal(size=(3, 4))
  query_texts = ["rain on a roof", "unscored", 'a "loud" dog, barking']
  assert graded_metrics(similarity, query_texts, clip_names, read_relevance_csv(str(path))) == graded_metrics(
    similarity, query_texts, clip_names, relevance
  )


def test_csv_errors_name_the_file_and_what_is_wrong(tmp_path):
  path = tmp_path / "bad.csv"
  write_csv(path, [["a dog", "['a.wav']"]], header=("query", "files"))
  with pytest.raises(ValueError, match=r"bad\.csv: the relevance CSV lacks the column\(s\) \['audio_filenames'\]"):
    read_relevance_csv(str(path))
  write_csv(path, [["a dog", "['a.wav']"], ["rain", "a.wav, b.wav"]])
  with pytest.raises(ValueError, match=r"bad\.csv line 3: audio_filenames must be a Python list .*'a\.wav, b\.wav'"):
    read_relevance_csv(str(path))
  write_csv(path, [["a dog", "['a.wav']"], ["a dog", "['b.wav']"]])
  with pytest.raises(ValueError, match=r"bad\.csv line 3: query 'a dog' appears a second time"):
    read_relevance_csv(str(path))
  write_csv(path, [])
  with pytest.raises(ValueError, match="no rows"):
    read_relevance_csv(str(path))


def test_tables_that_do_not_fit_the_evaluation_are_rejected():
  similarity = np.zeros((2, 3))
  queries, clips = ["a dog", "rain"], ["a.wav", "b.wav", "c.wav"]
  with pytest.raises(ValueError, match=r"1 queries .* not among the 2 evaluated captions, e.g. \['wind'\]"):
    graded_metrics(similarity, queries, clips, {"a dog": ["a.wav"], "wind": ["b.wav"]})
  with pytest.raises(ValueError, match=r"absent from the 3 evaluated clips, e.g. 'rain': \['x\.wav', 'y\.wav'\]"):
    graded_metrics(similarity, queries, clips, {"a dog": ["a.wav"], "rain": ["x.wav", "b.wav", "y.wav"]})
  with pytest.raises(ValueError, match="no relevant files"):
    graded_metrics(similarity, queries, clips, {"a dog": []})
  with pytest.raises(ValueError, match="repeated one"):
    graded_metrics(similarity, queries, clips, {"a dog": ["a.wav", "a.wav"]})
  with pytest.raises(ValueError, match="string in place"):
    graded_metrics(similarity, queries, clips, {"a dog": "a.wav"})
  with pytest.raises(ValueError, match="empty"):
    graded_metrics(similarity, queries, clips, {})
  with pytest.raises(ValueError, match=r"\[queries, clips\] = \(2, 3\)"):
    graded_metrics(similarity.T, queries, clips, {"a dog": ["a.wav"]})
  with pytest.raises(ValueError, match=r"repeats 1 file names, e.g. \['a\.wav'\]"):
    graded_metrics(similarity, queries, ["a.wav", "b.wav", "a.wav"], {"a dog": ["a.wav"]})
  with pytest.raises(ValueError, match="NaN"):
    graded_metrics(np.full((2, 3), np.nan), queries, clips, {"a dog": ["a.wav"]})
