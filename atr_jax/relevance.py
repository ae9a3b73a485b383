"""Graded (multi-positive) text-to-audio mAP@k of DCASE 2025 (SPEC 11) from a relevance table.

The table maps a query caption to the file names of its relevant clips; DCASE 2025 ships it as a CSV with the columns
``query,audio_filenames``, the second a Python list literal such as ``['a.wav', 'b.wav']``. AP@k of a query = sum over
its relevant clips ranked < k (0-based rank r_i of the i-th relevant clip in rank order) of i / (r_i + 1), divided by
its number of relevant clips; mAP@k is the mean over the table's queries (the challenge ranks by mAP@16). Ranks are
those of ``atr_jax.metrics`` (ties count against the query); evaluated captions that the table lacks are not scored.
"""

from __future__ import annotations

import ast
import csv
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from atr_jax.metrics import average_precision_at, relevant_positions

GRADED_KS = (10, 16)
CSV_COLUMNS = ("query", "audio_filenames")
_SHOWN = 5  # offending entries named in an error message


def read_relevance_csv(path: str) -> dict[str, tuple[str, ...]]:
  """The relevance table of a DCASE 2025 CSV: query caption -> its relevant file names (in the file's order)."""
  table = {}
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    missing = [column for column in CSV_COLUMNS if column not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f"{path}: the relevance CSV lacks the column(s) {missing}; its header is {reader.fieldnames}")
    for row in reader:
      where = f"{path} line {reader.line_num}"
      if row["query"] in table:
        raise ValueError(f"{where}: query {row['query']!r} appears a second time")
      table[row["query"]] = _file_names(row["audio_filenames"], where)
  if not table:
    raise ValueError(f"{path}: the relevance CSV has no rows")
  return table


def graded_metrics(
  similarity, query_texts: Sequence[str], clip_names: Sequence[str], relevance: Mapping[str, Collection[str]]
) -> dict[str, float]:
  """Graded t2a mAP@k for k in GRADED_KS: ``{'t2a_mAP10_graded': ..., 't2a_mAP16_graded': ...}``.

  ``similarity`` [N_q, N_c]: row i scores caption ``query_texts[i]`` against the clips named ``clip_names``.
  ``relevance``: query caption -> its relevant clip file names (e.g. from ``read_relevance_csv``). Every query of the
  table must be among ``query_texts`` (a repeated caption is scored by its first row: same text, same embedding) and
  every relevant file among ``clip_names``.
  """
  scores = np.asarray(similarity)
  if scores.shape != (len(query_texts), len(clip_names)):
    raise ValueError(
      f"similarity must be [queries, clips] = ({len(query_texts)}, {len(clip_names)}), got shape {scores.shape}"
    )
  if not np.isfinite(scores).all():
    raise ValueError("similarity holds NaN or infinite values")
  column_of_clip = {name: column for column, name in enumerate(clip_names)}
  if len(column_of_clip) != len(clip_names):
    repeated = sorted({name for name in clip_names if clip_names.count(name) > 1})
    raise ValueError(f"clip_names repeats {len(repeated)} file names, e.g. {repeated[:_SHOWN]}")
  row_of_query = {}
  for row, text in enumerate(query_texts):
    row_of_query.setdefault(text, row)
  _check_table(relevance, row_of_query, column_of_clip)
  queries = list(relevance)

  n_relevant = np.array([len(relevance[query]) for query in queries])
  table = np.full((len(queries), n_relevant.max()), -1, np.int64)
  for i, query in enumerate(queries):
    table[i, : n_relevant[i]] = [column_of_clip[name] for name in relevance[query]]
  position = relevant_positions(scores[[row_of_query[query] for query in queries]], table)
  return {f"t2a_mAP{k}_graded": float(np.mean(average_precision_at(position, n_relevant, k))) for k in GRADED_KS}


def _file_names(text: str | None, where: str) -> tuple[str, ...]:
  try:
    names = ast.literal_eval(text) if isinstance(text, str) else None
  except (ValueError, SyntaxError):
    names = None
  if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
    raise ValueError(
      f"{where}: audio_filenames must be a Python list of file names such as ['a.wav', 'b.wav'], got {text!r}"
    )
  return tuple(names)


def _check_table(relevance: Mapping[str, Collection[str]], row_of_query: dict, column_of_clip: dict) -> None:
  if not relevance:
    raise ValueError("the relevance table is empty")
  malformed = [
    query
    for query, names in relevance.items()
    if isinstance(names, str) or len(names) == 0 or len(set(names)) != len(names)
  ]
  if malformed:
    raise ValueError(
      f"{len(malformed)} queries of the relevance table have no relevant files, a repeated one, or a string in place "
      f"of a list of file names: {[(query, relevance[query]) for query in malformed[:_SHOWN]]}"
    )
  unknown = [query for query in relevance if query not in row_of_query]
  if unknown:
    raise ValueError(
      f"{len(unknown)} queries of the relevance table are not among the {len(row_of_query)} evaluated captions, "
      f"e.g. {unknown[:_SHOWN]}"
    )
  absent = {query: [name for name in names if name not in column_of_clip] for query, names in relevance.items()}
  absent = {query: names for query, names in absent.items() if names}
  if absent:
    shown = "; ".join(f"{query!r}: {names}" for query, names in list(absent.items())[:_SHOWN])
    raise ValueError(
      f"{len(absent)} queries of the relevance table have relevant files absent from the {len(column_of_clip)} "
      f"evaluated clips, e.g. {shown}"
    )
