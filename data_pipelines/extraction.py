"""Parallel, cached, resumable feature extraction of audio files, and the preparation report.

`Extractor(cache_dir, workers, form_name).run(paths, desc, names=...)` turns each audio file into an `AudioOutcome`:
the cache file of its stored array in the audio form `form_name` (`audio_forms`: the float16 (frames, 64) log-mel
`features.log_mel(features.read_audio(path))`, or the int16 (samples,) 32 kHz waveform) and its notes (downmixed,
resampled, silent: digital silence is valid audio, its log-mel is the floor), or the reason it is skipped because it
cannot be decoded or is shorter than one hop (missing_audio, empty_file, unreadable_audio, truncated_audio,
too_short): notes and reasons are the same for both forms. Files are processed by `workers` child processes
(`python -m data_pipelines.extraction CACHE_DIR FORM_NAME`: they import this module, `audio_forms` and `features`
only, never TensorFlow nor the caller's main module) under a progress bar; a file whose decoding kills its worker
process is skipped too, the others go on.

The cache holds one `<sha1 of name, size, mtime and the form's version>.npz` per good clip (the array under the form's
name, and the notes; waveform entries have their own), written under a temporary name and renamed (`os.replace`), so a
killed run never leaves a partial entry and a restarted run decodes only the files not cached yet: it ends with
exactly the arrays of an uninterrupted run. A file's name in the key is the one its caller gives it (a dataset
preparation: `<split>/<the clip's file name>`, alike in every raw folder layout that names the file alike, wherever
the folder lies), else its absolute path: a raw folder moved, copied with its modification times (`cp -a`,
`shutil.copytree`) or laid out anew is served from the cache, while a file whose size or modification time changed
is decoded again.
Skipped files are not cached (they fail fast, and a repaired file is picked up). The cache outlives a preparation, so
that preparing again after the sources changed decodes only new and modified files; `keep_only` drops the entries a
preparation no longer uses.

`Report` collects, per split, the clips and captions read and written, what was skipped (by reason: a skipped clip
takes its captions with it) and what was noted (by kind); it writes them as a CSV and `format_summary` prints them.
"""

import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import queue
import subprocess
import sys
import zipfile
from concurrent import futures

import numpy as np
import threadpoolctl
import tqdm

from data_pipelines import audio_forms, features

SILENCE_PEAK = 1e-4  # -80 dBFS: a clip whose 32 kHz waveform never reaches it is noted silent (16-bit LSB 3e-5).
REPORT_COLUMNS = ("dataset", "split", "item", "outcome", "reason", "detail")
SKIPPED_CLIP, SKIPPED_CAPTION, NOTE = "skipped clip", "skipped caption", "note"
_PARTIAL_SUFFIX = ".partial-"


@dataclasses.dataclass(frozen=True)
class AudioOutcome:
  """A good clip (`cache_path` set) or a skipped one (`reason` set); `notes` are (kind, detail) conversions."""

  cache_path: str | None
  reason: str = ""
  detail: str = ""
  notes: tuple[tuple[str, str], ...] = ()


def _entry_form(names) -> str:
  """The audio form whose array a cache entry holds, among the entry's array `names`."""
  found = [name for name in audio_forms.AUDIO_FORMS if name in names]
  if len(found) != 1:
    raise ValueError(f"a feature cache entry holds {sorted(names)}: not one of {sorted(audio_forms.AUDIO_FORMS)}")
  return found[0]


def load_clip(cache_path: str) -> np.ndarray:
  """The stored array of a cache entry, whichever its form: float16 (frames, 64) log-mel or int16 (samples,)."""
  with np.load(cache_path) as entry:
    return entry[_entry_form(entry.files)]


def stored_length(cache_path: str) -> int:
  """The rows of a cache entry's array (frames of a log-mel, samples of a waveform), read from its header (the data
  stays unread)."""
  with zipfile.ZipFile(cache_path) as archive:
    name = _entry_form({os.path.splitext(member)[0] for member in archive.namelist()})
    with archive.open(f"{name}.npy") as f:
      version = np.lib.format.read_magic(f)
      read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
      shape, _, _ = read_header(f)
  return int(shape[0])


def _cache_version(form: audio_forms.AudioForm) -> str:
  return f"{form.version}|silence<{SILENCE_PEAK}"  # The log-mel's is the key of every log-mel cache so far.


def _cache_path(cache_dir: str, name: str, stat: os.stat_result, form: audio_forms.AudioForm) -> str:
  identity = f"{name}\n{stat.st_size}\n{stat.st_mtime_ns}\n{_cache_version(form)}"
  return os.path.join(cache_dir, hashlib.sha1(identity.encode("utf-8")).hexdigest() + ".npz")


def _cached_notes(cache_path: str) -> tuple[tuple[str, str], ...] | None:
  """The notes of a complete cache entry, None when there is none (or it cannot be read: then it is redone)."""
  if not os.path.exists(cache_path):
    return None
  try:
    with np.load(cache_path) as entry:
      return tuple(tuple(note) for note in json.loads(str(entry["notes"])))
  except Exception:  # A damaged entry (disk trouble) is recomputed, never trusted.
    return None


def _write_cache(cache_path: str, name: str, stored: np.ndarray, notes: tuple[tuple[str, str], ...]) -> None:
  partial = f"{cache_path}{_PARTIAL_SUFFIX}{os.getpid()}"
  with open(partial, "wb") as f:
    np.savez(f, **{name: stored}, notes=np.array(json.dumps(notes)))
  os.replace(partial, cache_path)


def keep_only(cache_dir: str, used: set[str]) -> None:
  """Deletes the cache entries of `cache_dir` other than `used` (cache paths): files no longer read, or changed."""
  for name in os.listdir(cache_dir):
    path = os.path.join(cache_dir, name)
    if name.endswith(".npz") and path not in used:
      os.remove(path)


def clear_partial_writes(cache_dir: str) -> None:
  """Creates `cache_dir` if needed and deletes the partial writes a killed run left in it."""
  os.makedirs(cache_dir, exist_ok=True)
  for name in os.listdir(cache_dir):
    if _PARTIAL_SUFFIX in name:
      os.remove(os.path.join(cache_dir, name))


def _conversion_notes(source: features.AudioSource) -> tuple[tuple[str, str], ...]:
  notes = []
  if source.channels > 1:
    notes.append(("downmixed", f"{source.channels} channels averaged to mono"))
  if source.sample_rate != features.SAMPLE_RATE:
    notes.append(("resampled", f"{source.sample_rate} Hz to {features.SAMPLE_RATE} Hz"))
  return tuple(notes)


def extract(path: str, cache_dir: str, form_name: str = "log_mel", name: str | None = None) -> AudioOutcome:
  """The outcome of one audio file in the audio form `form_name`, from the cache when it holds the file (known by
  `name`, default its absolute path, its size and its modification time), else computed and cached."""
  form = audio_forms.audio_form(form_name, key="form_name")
  try:
    stat = os.stat(path)
  except FileNotFoundError:
    return AudioOutcome(None, "missing_audio", f"audio file {path} does not exist")
  except OSError as e:
    return AudioOutcome(None, "unreadable_audio", f"cannot read audio file {path}: {e}")
  if not os.path.isfile(path):
    return AudioOutcome(None, "missing_audio", f"{path} is not a file")
  cache_path = _cache_path(cache_dir, os.path.abspath(path) if name is None else name, stat, form)
  notes = _cached_notes(cache_path)
  if notes is not None:
    return AudioOutcome(cache_path, notes=notes)
  try:
    waveform, source = features.read_audio(path)
    stored = form.compute(waveform)
  except features.AudioError as e:
    return AudioOutcome(None, e.reason, str(e))
  except Exception as e:  # An unforeseen decoder failure skips this clip only; the report shows it.
    return AudioOutcome(None, "unreadable_audio", f"{path}: {type(e).__name__}: {e}")
  notes = _conversion_notes(source)
  peak = float(np.max(np.abs(waveform)))
  if peak < SILENCE_PEAK:  # Kept: a silent clip is valid audio, and evaluation must rank every listed clip.
    notes += (("silent", f"peak {peak:.2g} is below {SILENCE_PEAK:g}: the log-mel is at its floor"),)
  _write_cache(cache_path, form.name, stored, notes)
  return AudioOutcome(cache_path, notes=notes)


def default_workers() -> int:
  """The CPU cores this process may run on."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class WorkerProcess:
  """A child `python -m data_pipelines.extraction CACHE_DIR FORM_NAME` (it imports this module, `audio_forms` and
  `features` only, never the caller's main module nor TensorFlow): it reads a JSON [path, cache name or null] a
  line and answers each with its outcome in audio form FORM_NAME as a JSON line. A child that dies is restarted at the
  next clip."""

  def __init__(self, cache_dir: str, form_name: str = "log_mel"):
    self._cache_dir = cache_dir
    self._form_name = audio_forms.audio_form(form_name, key="form_name").name
    self._process = None

  def _start(self) -> subprocess.Popen:
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    python_path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    return subprocess.Popen(
      [sys.executable, "-m", "data_pipelines.extraction", self._cache_dir, self._form_name],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      encoding="utf-8",
      env=dict(os.environ, PYTHONPATH=python_path),
    )

  def extract(self, path: str, name: str | None = None) -> AudioOutcome:
    if self._process is None:
      self._process = self._start()
    try:
      self._process.stdin.write(json.dumps([path, name]) + "\n")
      self._process.stdin.flush()
      answer = self._process.stdout.readline()
    except OSError:  # BrokenPipeError: the child is gone.
      answer = ""
    if answer:
      fields = json.loads(answer)
      return AudioOutcome(
        fields["cache_path"], fields["reason"], fields["detail"], tuple(tuple(note) for note in fields["notes"])
      )
    status = self._process.wait()
    self._process = None
    return AudioOutcome(
      None,
      "unreadable_audio",
      f"decoding {path} killed its worker process (exit status {status}: a decoder crash, or out of memory)",
    )

  def close(self, kill: bool) -> None:
    if self._process is not None:
      if kill:
        self._process.kill()
      self._process.stdin.close()
      self._process.wait()
      self._process = None


def _serve(cache_dir: str, form_name: str) -> None:
  """Worker loop (`python -m data_pipelines.extraction CACHE_DIR FORM_NAME`): JSON [path, cache name] on stdin,
  outcomes on stdout."""
  answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # Whatever else writes to stdout cannot garble the answers.
  threadpoolctl.threadpool_limits(limits=1, user_api="blas")  # One BLAS thread: the workers use every core.
  for line in sys.stdin:
    path, name = json.loads(line)
    answers.write(json.dumps(dataclasses.asdict(extract(path, cache_dir, form_name, name))) + "\n")
    answers.flush()


class Extractor:
  """Context manager holding the worker processes (none when workers == 1: then files are decoded in this process), the
  cache folder and the audio form `form_name` extracted. A worker that dies (a decoder crash, the out-of-memory killer)
  costs only the clip it was decoding, which is skipped as unreadable; the run goes on."""

  def __init__(self, cache_dir: str, workers: int | None = None, form_name: str = "log_mel"):
    self.cache_dir = cache_dir
    self.form_name = audio_forms.audio_form(form_name, key="form_name").name
    self.workers = workers or default_workers()
    if self.workers < 1:
      raise ValueError(f"workers must be at least 1, got {workers}")
    self._processes = []
    self._idle = queue.SimpleQueue()

  def __enter__(self) -> "Extractor":
    clear_partial_writes(self.cache_dir)
    if self.workers > 1:
      self._processes = [WorkerProcess(self.cache_dir, self.form_name) for _ in range(self.workers)]
      for process in self._processes:
        self._idle.put(process)
    return self

  def __exit__(self, exc_type, *exc_info) -> None:
    for process in self._processes:
      process.close(kill=exc_type is not None)
    self._processes = []

  def _extract_in_a_worker(self, path: str, name: str | None) -> AudioOutcome:
    process = self._idle.get()
    try:
      return process.extract(path, name)
    finally:
      self._idle.put(process)

  def run(
    self, paths: list[str], desc: str, progress: tqdm.tqdm | None = None, names: dict[str, str] | None = None
  ) -> list[AudioOutcome]:
    """Outcomes of `paths`, in their order, under a progress bar (clips/s) titled `desc`, or advancing `progress`, a
    bar the caller holds open (then `desc` is not used). `names`: the cache name of each path (`extract`; default:
    its absolute path)."""
    names = names or {}
    outcomes = [None] * len(paths)
    with (
      tqdm.tqdm(total=len(paths), desc=desc, unit="clip", smoothing=0.1)
      if progress is None
      else contextlib.nullcontext(progress)
    ) as progress:
      if not self._processes:
        with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
          for index, path in enumerate(paths):
            outcomes[index] = extract(path, self.cache_dir, self.form_name, names.get(path))
            progress.update()
        return outcomes
      threads = futures.ThreadPoolExecutor(self.workers)
      try:
        pending = {
          threads.submit(self._extract_in_a_worker, path, names.get(path)): index for index, path in enumerate(paths)
        }
        for future in futures.as_completed(pending):
          outcomes[pending[future]] = future.result()
          progress.update()
      finally:  # On an error or Ctrl-C, only the clips in flight are waited for.
        threads.shutdown(cancel_futures=True)
    return outcomes


def _count(counter: dict, key: str, amount: int = 1) -> None:
  counter[key] = counter.get(key, 0) + amount


class Report:
  """What a preparation read, wrote, skipped and noted, per split (`counts` is JSON-serialisable)."""

  def __init__(self, dataset: str):
    self.dataset = dataset
    self.rows: list[tuple[str, str, str, str, str, str]] = []
    self.counts: dict[str, dict] = {}

  def split_counts(self, split: str) -> dict:
    return self.counts.setdefault(
      split,
      {
        "clips_read": 0,
        "captions_read": 0,
        "clips_written": 0,
        "captions_written": 0,
        "skipped_clips": {},
        "skipped_captions": {},
        "notes": {},
      },
    )

  def read(self, split: str, captions: int) -> None:
    """One clip read from the raw data, with `captions` caption cells (empty ones included)."""
    counts = self.split_counts(split)
    counts["clips_read"] += 1
    counts["captions_read"] += captions

  def written(self, split: str, captions: int) -> None:
    counts = self.split_counts(split)
    counts["clips_written"] += 1
    counts["captions_written"] += captions

  def skip_clip(self, split: str, item: str, reason: str, detail: str, captions: int) -> None:
    """A clip left out, taking its `captions` (non-empty) captions with it."""
    counts = self.split_counts(split)
    _count(counts["skipped_clips"], reason)
    if captions:
      _count(counts["skipped_captions"], reason, captions)
    self.rows.append((self.dataset, split, item, SKIPPED_CLIP, reason, detail))

  def skip_caption(self, split: str, item: str, reason: str, detail: str) -> None:
    _count(self.split_counts(split)["skipped_captions"], reason)
    self.rows.append((self.dataset, split, item, SKIPPED_CAPTION, reason, detail))

  def note(self, split: str, item: str, kind: str, detail: str) -> None:
    _count(self.split_counts(split)["notes"], kind)
    self.rows.append((self.dataset, split, item, NOTE, kind, detail))

  def write_csv(self, path: str) -> None:
    """The rows split by split (in the order the splits were first counted), each split's in the order reported."""
    split_order = {split: i for i, split in enumerate(self.counts)}
    with open(path, "w", newline="", encoding="utf-8") as f:
      writer = csv.writer(f)
      writer.writerow(REPORT_COLUMNS)
      writer.writerows(sorted(self.rows, key=lambda row: split_order[row[1]]))


def _by_key(counter: dict) -> str:
  return ", ".join(f"{key} {value}" for key, value in sorted(counter.items())) or "none"


def format_summary(dataset: str, counts: dict[str, dict]) -> str:
  """Lines of counts per split: clips and captions read / written, skipped by reason, notes by kind."""
  lines = []
  for split, c in counts.items():
    lines.append(
      f"{dataset} {split}: clips {c['clips_read']} read, {c['clips_written']} written, "
      f"{sum(c['skipped_clips'].values())} skipped; captions {c['captions_read']} read, "
      f"{c['captions_written']} written, {sum(c['skipped_captions'].values())} skipped"
    )
    lines.append(f"  skipped clips: {_by_key(c['skipped_clips'])}")
    lines.append(f"  skipped captions: {_by_key(c['skipped_captions'])}")
    lines.append(f"  notes: {_by_key(c['notes'])}")
  return "\n".join(lines)


if __name__ == "__main__":
  _serve(sys.argv[1], sys.argv[2])
