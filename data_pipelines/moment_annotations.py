"""Moment-retrieval annotations: one record type (`MomentQuery`) and the readers and writer of the released formats.

Formats (SPEC 12), read with their quirks:
- lighthouse JSONL (CASTELLA `castella_{train,val,test}_release.jsonl`, Clotho-Moment
  `clotho_moment_{train,val,test}_release.jsonl`, and what `data_pipelines.moments synthesize` writes): one query a
  line, `qid` (a string: "<yid>_<k>" for CASTELLA, a running number for Clotho-Moment; a number is taken as its
  text), `query`, `duration` (integer seconds), `vid`, `relevant_windows` ([[start, end], ...] seconds, integers for
  CASTELLA, floats at 0.1 s for Clotho-Moment, in any order), and for Clotho-Moment `fg_dB` (the event's gain in dB
  relative to the background's RMS).
- CASTELLA's official JSON (`json/en/{train,val,test}.json`): a list of recordings, each `yid`, `global_caption`,
  `duration`, `num_moments`, `moments` [{`local_caption`, `timestamps` [[s, e], ...]}]; a recording may have no
  moment. Its k-th moment (from 1) is query "<yid>_<k>", as in the JSONL.

Windows are checked against the recording's duration (`check_windows`): an end past the duration is clipped to it
(CASTELLA's JSONL has ends 1-2 s past its rounded-down durations, and one [299, 4800]), a negative start is clipped
to 0, and a window left empty (start >= end) is dropped; a query left without a window is dropped. Every change is a
`WindowProblem` (qid, window, what was done), returned beside the queries: never silently kept, never silently lost.
The window order of the file is kept.
"""

import dataclasses
import json
import os

from atr_jax.atomic_files import write_text_atomically

JSONL_FIELDS = ("qid", "query", "duration", "vid", "relevant_windows")
CASTELLA_RECORDING_FIELDS = ("yid", "duration", "moments")
CASTELLA_MOMENT_FIELDS = ("local_caption", "timestamps")
FG_DB = "fg_dB"


@dataclasses.dataclass(frozen=True)
class MomentQuery:
  """One query of one recording: its windows are (start, end) seconds inside [0, duration], start < end, in the
  file's order; `fg_db` is Clotho-Moment's foreground gain (None for other datasets)."""

  qid: str
  query: str
  vid: str
  duration: float
  windows: tuple[tuple[float, float], ...]
  fg_db: float | None = None

  def to_json(self) -> dict:
    """The lighthouse JSONL line of this query (`fg_dB` only when set); whole seconds written as integers."""
    line = {
      "qid": self.qid,
      "query": self.query,
      "duration": _number(self.duration),
      "vid": self.vid,
      "relevant_windows": [[_number(s), _number(e)] for s, e in self.windows],
    }
    if self.fg_db is not None:
      line[FG_DB] = self.fg_db
    return line


@dataclasses.dataclass(frozen=True)
class WindowProblem:
  """A window changed or dropped by `check_windows` (or a query dropped: then `window` is None)."""

  source: str
  qid: str
  window: tuple | None
  problem: str
  action: str

  def __str__(self) -> str:
    window = "" if self.window is None else f" window {list(self.window)}"
    return f"{self.source}: {self.qid}{window}: {self.problem}; {self.action}"


def _number(value: float):
  return int(value) if float(value).is_integer() else float(value)


def check_windows(
  source: str, qid: str, windows, duration: float
) -> tuple[tuple[tuple[float, float], ...], list[WindowProblem]]:
  """(the windows clipped to [0, duration] without the empty ones, a WindowProblem for each one changed or
  dropped); a ValueError naming `source` and `qid` when `windows` is not a list of [start, end] number pairs."""
  if not isinstance(windows, list) or not all(
    isinstance(w, list | tuple)
    and len(w) == 2
    and all(isinstance(v, int | float) and not isinstance(v, bool) for v in w)
    for w in windows
  ):
    raise ValueError(f"{source}: query {qid}: windows must be a list of [start, end] seconds, got {windows!r}")
  kept, problems = [], []
  for window in windows:
    start, end = float(window[0]), float(window[1])
    note = lambda problem, action: problems.append(WindowProblem(source, qid, tuple(window), problem, action))  # noqa: E731
    if start >= end:
      note("start >= end", "dropped")
      continue
    if end > duration:
      end = float(duration)
      if start >= end:
        note(f"starts at or after the duration {_number(duration)} s", "dropped")
        continue
      note(f"ends past the duration {_number(duration)} s", f"end clipped to {_number(end)}")
    if start < 0:
      note("starts before 0", "start clipped to 0")
      start = 0.0
    kept.append((start, end))
  return tuple(kept), problems


def _query(source: str, qid: str, query: str, vid: str, duration, windows, fg_db) -> tuple:
  """(MomentQuery or None when no window is left, problems)."""
  if not isinstance(duration, int | float) or isinstance(duration, bool) or duration <= 0:
    raise ValueError(f"{source}: query {qid}: duration must be a positive number of seconds, got {duration!r}")
  kept, problems = check_windows(source, qid, windows, float(duration))
  if not kept:
    problems.append(WindowProblem(source, qid, None, "no usable window", "query dropped"))
    return None, problems
  return MomentQuery(qid, str(query), str(vid), float(duration), kept, fg_db), problems


def read_jsonl(path: str) -> tuple[list[MomentQuery], list[WindowProblem]]:
  """The queries of a lighthouse-format JSONL file (CASTELLA, Clotho-Moment, ours) and the window problems found;
  a ValueError naming the file and line for a line that is not JSON or lacks a field."""
  queries, problems = [], []
  with open(path, encoding="utf-8") as f:
    for number, text in enumerate(f, 1):
      if not text.strip():
        continue
      where = f"{path} line {number}"
      try:
        line = json.loads(text)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
      missing = [field for field in JSONL_FIELDS if field not in line]
      if missing:
        raise ValueError(f"{where}: missing field(s) {missing} (a lighthouse JSONL line has {list(JSONL_FIELDS)})")
      fg_db = line.get(FG_DB)
      query, found = _query(
        where,
        str(line["qid"]),
        line["query"],
        line["vid"],
        line["duration"],
        line["relevant_windows"],
        None if fg_db is None else float(fg_db),
      )
      problems += found
      if query is not None:
        queries.append(query)
  return queries, problems


def read_castella_json(path: str) -> tuple[list[MomentQuery], list[WindowProblem]]:
  """The queries of a CASTELLA official JSON file (a recording without moments gives none) and the window
  problems found; a ValueError naming the file and recording for a missing field."""
  with open(path, encoding="utf-8") as f:
    try:
      recordings = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not JSON ({e})") from None
  if not isinstance(recordings, list):
    raise ValueError(f"{path}: expected a list of recordings (CASTELLA json/en/<split>.json)")
  queries, problems = [], []
  for index, recording in enumerate(recordings):
    missing = [field for field in CASTELLA_RECORDING_FIELDS if field not in recording]
    if missing:
      raise ValueError(f"{path}: recording #{index}: missing field(s) {missing}")
    yid = recording["yid"]
    for k, moment in enumerate(recording["moments"], 1):
      missing = [field for field in CASTELLA_MOMENT_FIELDS if field not in moment]
      if missing:
        raise ValueError(f"{path}: recording {yid} moment {k}: missing field(s) {missing}")
      query, found = _query(
        f"{path} ({yid})",
        f"{yid}_{k}",
        moment["local_caption"],
        yid,
        recording["duration"],
        moment["timestamps"],
        None,
      )
      problems += found
      if query is not None:
        queries.append(query)
  return queries, problems


def read_annotations(path: str) -> tuple[list[MomentQuery], list[WindowProblem]]:
  """`read_jsonl` for a .jsonl file, `read_castella_json` for a .json file; a ValueError for anything else."""
  extension = os.path.splitext(path)[1].lower()
  if extension == ".jsonl":
    return read_jsonl(path)
  if extension == ".json":
    return read_castella_json(path)
  raise ValueError(f"{path}: a moment annotation file is lighthouse JSONL (.jsonl) or CASTELLA JSON (.json)")


def write_jsonl(path: str, queries: list[MomentQuery]) -> None:
  """Writes `queries` as lighthouse JSONL, atomically."""
  write_text_atomically(path, "".join(json.dumps(q.to_json(), ensure_ascii=False) + "\n" for q in queries))
