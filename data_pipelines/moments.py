"""Command line of the moment-retrieval data: a Clotho-Moment-style synthetic set made from any Clotho-layout folder,
and the preparation of a split into TFRecords.

  python -m data_pipelines.moments synthesize --clips_dir RAW --out_dir OUT [--background_dir BG] [--duration 60]
      [--seed 0] [--overwrite]
  python -m data_pipelines.moments prepare --annotations OUT/val.jsonl --audio_dir OUT/val [--out_dir PREPARED]
      [--workers N]

RAW is a captioned clip folder in any Clotho layout (`layouts`: native, aac-datasets, reference; ours from
`python -m data_pipelines.synthetic` included). Its splits carry over, development -> train, validation -> val,
evaluation -> test, and each clip is used once, so no clip is in two splits. Per split the clips are shuffled and
dealt out to recordings of `--duration` seconds, 1-3 events each (SPEC 12, Clotho-Moment's rules; `moment_synthesis`):
- foreground: the clip trimmed at 1 s resolution to its span louder than mean power - 5 dB, at most 30 s (a clip
  whose span is under 1 s is skipped), peak-normalised; its query is one of its captions at random;
- placement: one after another without overlap, each after an exponential gap of mean 30 s x duration / 60 (30 s
  for Clotho-Moment's 60 s recordings; the mean scales with `--duration`, so a short recording is not all gap), the
  gaps shrunk together when they do not fit; starts on a 0.1 s grid;
- gain: fg_dB ~ U[-5, 5] dB relative to the background's original RMS; background attenuated by U[-25, -15] dB;
  the mix peak-normalised; 32 kHz mono 16-bit wav.
Background: with `--background_dir`, cuts of `--duration` s at whole-second offsets of its audio files (recordings
longer than the duration; a file that cannot be read is reported and not used), vid "<file stem>_<start>_<end>" as
Clotho-Moment's ("Singapore_8.0_68.0"); without it, a procedural ambience (`moment_synthesis.procedural_ambience`: no
silence), vid "ambience-<split>-<index>_0.0_<duration>". Backgrounds may recur across splits; foreground clips never.

Output (written into a temporary folder beside OUT, renamed once complete): `<split>/<vid>.wav`,
`{train,val,test}.jsonl` in lighthouse's format (`qid` a running number as a string across train, val, test;
`query`, `duration`, `vid`, `relevant_windows` [[start, end]] at 0.1 s, `fg_dB`; one query per event), and
`synthesis.json`: the settings, counts per split, the clip file of each query's event and its recording's background
gain (`events`, by qid) and every skipped clip or background with its reason. A clip that
cannot be decoded is skipped and reported; the others are used. Everything is drawn from generators seeded by
(seed, split, recording): the same seed and folder give identical files.

prepare: one split (an annotation file, lighthouse JSONL or CASTELLA JSON, and the folder of its recordings) into
TFRecords of its recordings with their queries (`moment_builder`; PREPARED defaults to `prepared/` beside the
annotations), then prints the counts and where the report of every skipped recording, dropped query and changed
window is. Run again, it prepares again only when the annotation file or a recording changed; a killed run resumes.
"""

import argparse
import dataclasses
import json
import os
import sys

import numpy as np
import soundfile as sf
import tqdm

from atr_jax.atomic_files import write_folder_atomically, write_text_atomically
from data_pipelines import clip_builder, extraction, features, layouts, moment_builder, moment_synthesis
from data_pipelines.features import SAMPLE_RATE
from data_pipelines.moment_annotations import MomentQuery, write_jsonl

SPLITS = {"development": "train", "validation": "val", "evaluation": "test"}  # Clotho split -> moment split.
EVENTS_PER_RECORDING = (1, 3)
EVENT_SECONDS = (1.0, 30.0)
FG_DB_RANGE = (-5.0, 5.0)
BACKGROUND_DB_RANGE = (-25.0, -15.0)
CLOTHO_MOMENT_SECONDS, CLOTHO_MOMENT_MEAN_GAP_S = 60, 30.0
MIN_DURATION_S = 3
MANIFEST_FILE = "synthesis.json"


@dataclasses.dataclass(frozen=True)
class Foreground:
  """A usable clip: its trimmed, peak-normalised waveform and its captions."""

  file_name: str
  waveform: np.ndarray
  captions: tuple[str, ...]


def mean_gap_s(duration_s: float) -> float:
  """The exponential gaps' mean: Clotho-Moment's 30 s for 60 s recordings, scaled with the duration."""
  return CLOTHO_MOMENT_MEAN_GAP_S * duration_s / CLOTHO_MOMENT_SECONDS


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([seed, list(SPLITS.values()).index(split), index]))


def read_clips(clips_dir: str) -> tuple[dict[str, list[clip_builder.ClipRow]], list[dict]]:
  """The captioned clips of each moment split (by `SPLITS`), and the rows skipped while reading the CSVs."""
  layout = layouts.detect("clotho", clips_dir)
  report = extraction.Report("moments")
  clips = {}
  for clotho_split, split in SPLITS.items():
    source = layout.splits[clotho_split]
    if not source.present():
      continue
    table = clip_builder.read_csv(source.csv_path, clotho_split, report)
    rows = clip_builder.file_name_table(table, source.audio_dir, clotho_split, report)
    clips[split] = clip_builder.unique_clips(rows, clotho_split, report, need_captions=True)
  skipped = [
    {"split": SPLITS[split], "item": item, "reason": f"{reason}: {detail}"}
    for _, split, item, outcome, reason, detail in report.rows
    if outcome == extraction.SKIPPED_CLIP
  ]
  if not clips:
    raise FileNotFoundError(f"{clips_dir}: no Clotho caption CSV of {list(SPLITS)} ({layout.describe()})")
  return clips, skipped


def load_foreground(row: clip_builder.ClipRow) -> Foreground:
  """The clip trimmed to its loud span (at most 30 s), peak-normalised; a features.AudioError when it cannot be
  decoded or its loud span is under 1 s."""
  waveform = moment_synthesis.loud_span(features.load_audio(row.audio_path))
  waveform = waveform[: int(EVENT_SECONDS[1] * SAMPLE_RATE)]
  if len(waveform) < EVENT_SECONDS[0] * SAMPLE_RATE or not np.any(waveform):
    raise features.AudioError(
      f"{row.audio_path}: its loud span is {len(waveform) / SAMPLE_RATE:.2f} s, under {EVENT_SECONDS[0]:g} s (or "
      "silent)",
      reason="too_short",
    )
  return Foreground(row.file_name, moment_synthesis.peak_normalised(waveform), row.captions)


class Backgrounds:
  """Background cuts of `duration_s` seconds: from the long recordings of `background_dir`, or procedural."""

  def __init__(self, background_dir: str | None, duration_s: int):
    self.duration_s = duration_s
    self.skipped = []
    self._files, self._used = [], set()
    if background_dir is None:
      return
    paths = sorted(
      os.path.join(root, name)
      for root, _, names in os.walk(background_dir)
      for name in names
      if os.path.splitext(name)[1].lower() in features.audio_extensions()
    )
    for path in paths:
      try:
        frames = sf.info(path).duration
      except Exception as e:  # Unreadable: reported, the others are used.
        self.skipped.append({"item": path, "reason": f"unreadable_audio: {e}"})
        continue
      if frames < duration_s + 1:
        self.skipped.append({"item": path, "reason": f"shorter than {duration_s + 1} s"})
      else:
        self._files.append((path, int(frames)))
    if not self._files:
      raise FileNotFoundError(
        f"--background_dir={background_dir}: no readable audio file longer than {duration_s + 1} s "
        f"({len(self.skipped)} skipped)"
      )

  def cut(self, split: str, index: int, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """(vid, waveform) of a new background; a cut of a long recording is never used twice."""
    if not self._files:
      vid = f"ambience-{split}-{index:05d}_0.0_{float(self.duration_s)}"
      return vid, moment_synthesis.procedural_ambience(self.duration_s * SAMPLE_RATE, rng)
    for _ in range(100):
      path, seconds = self._files[rng.integers(len(self._files))]
      offset = int(rng.integers(0, seconds - self.duration_s))
      vid = f"{os.path.splitext(os.path.basename(path))[0]}_{float(offset)}_{float(offset + self.duration_s)}"
      if vid not in self._used:
        break
    else:
      raise ValueError("the background recordings hold too few distinct cuts for this many recordings")
    self._used.add(vid)
    waveform = features.load_audio(path)[offset * SAMPLE_RATE : (offset + self.duration_s) * SAMPLE_RATE]
    if not np.any(waveform):
      waveform = waveform + moment_synthesis.procedural_ambience(len(waveform), rng) * 1e-3  # Never divide by 0.
    return vid, waveform


def synthesize_split(
  split: str, foregrounds: list[Foreground], backgrounds: Backgrounds, out_dir: str, seed: int, first_qid: int
) -> tuple[list[MomentQuery], dict[str, dict]]:
  """Writes the recordings of one split into `out_dir/<split>/` and returns their queries (qids from `first_qid`)
  and, by qid, the clip file of the query's event and its recording's background gain in dB."""
  duration = backgrounds.duration_s
  os.makedirs(os.path.join(out_dir, split), exist_ok=True)
  order = np.random.default_rng(np.random.SeedSequence([seed, list(SPLITS.values()).index(split), 1 << 30]))
  pool = [foregrounds[i] for i in order.permutation(len(foregrounds))]
  queries, sources, index = [], {}, 0
  with tqdm.tqdm(total=len(pool), desc=f"synthesising {split}", unit="clip") as progress:
    while pool:
      rng = _rng(seed, split, index)
      count = int(rng.integers(EVENTS_PER_RECORDING[0], EVENTS_PER_RECORDING[1] + 1))
      events = []
      for foreground in pool[:count]:  # As many as fit (each clip is at most 30 s, a recording at least 3 s).
        lengths = [len(e.waveform) / SAMPLE_RATE for e in events + [foreground]]
        if sum(lengths) + moment_synthesis.WINDOW_GRID_S * len(lengths) > duration:
          break
        events.append(foreground)
      if not events:  # A clip longer than the recording: cut to fit.
        head = pool[0]
        keep = int((duration - 2 * moment_synthesis.WINDOW_GRID_S) * SAMPLE_RATE)
        events = [dataclasses.replace(head, waveform=moment_synthesis.peak_normalised(head.waveform[:keep]))]
      del pool[: len(events)]
      lengths = [len(e.waveform) / SAMPLE_RATE for e in events]
      starts = moment_synthesis.place_events(lengths, duration, mean_gap_s(duration), rng)
      fg_dbs = [float(rng.uniform(*FG_DB_RANGE)) for _ in events]
      vid, background = backgrounds.cut(split, index, rng)
      background_db = float(rng.uniform(*BACKGROUND_DB_RANGE))
      audio = moment_synthesis.mix(
        background, [e.waveform for e in events], [int(round(s * SAMPLE_RATE)) for s in starts], fg_dbs, background_db
      )
      sf.write(os.path.join(out_dir, split, f"{vid}.wav"), audio, SAMPLE_RATE, subtype="PCM_16")
      for event, start, length, fg_db in zip(events, starts, lengths, fg_dbs):
        window = (start, min(float(duration), round(start + length, 1)))
        caption = event.captions[int(rng.integers(len(event.captions)))]
        qid = str(first_qid + len(queries))
        queries.append(MomentQuery(qid, caption, vid, float(duration), (window,), fg_db))
        sources[qid] = {"clip": event.file_name, "background_db": background_db}
      progress.update(len(events))
      index += 1
  return queries, sources


def synthesize(
  clips_dir: str,
  out_dir: str,
  *,
  background_dir: str | None = None,
  duration_s: int = CLOTHO_MOMENT_SECONDS,
  seed: int = 0,
  overwrite: bool = False,
) -> dict:
  """Writes the synthetic moment set into `out_dir` (atomically: a temporary folder beside it, renamed once
  complete) and returns its manifest (also `synthesis.json`)."""
  if int(duration_s) != duration_s or duration_s < MIN_DURATION_S:
    raise ValueError(f"--duration must be a whole number of seconds >= {MIN_DURATION_S}, got {duration_s}")
  duration_s = int(duration_s)
  out_dir = os.path.abspath(out_dir)
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f"--out_dir={out_dir} exists and is not empty; pass --overwrite to replace it")
  clips, skipped = read_clips(clips_dir)
  backgrounds = Backgrounds(background_dir, duration_s)
  manifest = {
    "clips_dir": os.path.abspath(clips_dir),
    "background_dir": os.path.abspath(background_dir) if background_dir else None,
    "duration": duration_s,
    "seed": seed,
    "mean_gap_s": mean_gap_s(duration_s),
    "splits": {},
    "events": {},  # qid -> {"clip": the clip file its event was made of, "background_db": its background's gain}.
  }

  def write(folder: str) -> None:
    qid = 0
    for split, rows in clips.items():
      foregrounds = []
      for row in tqdm.tqdm(rows, desc=f"trimming {split} clips", unit="clip"):
        try:
          foregrounds.append(load_foreground(row))
        except features.AudioError as e:
          skipped.append({"split": split, "item": row.file_name, "reason": f"{e.reason}: {e}"})
      queries, sources = (
        synthesize_split(split, foregrounds, backgrounds, folder, seed, qid) if foregrounds else ([], {})
      )
      qid += len(queries)
      manifest["events"].update(sources)
      write_jsonl(os.path.join(folder, f"{split}.jsonl"), queries)
      manifest["splits"][split] = {
        "clips": len(rows),
        "clips_used": len(foregrounds),
        "recordings": len({q.vid for q in queries}),
        "queries": len(queries),
      }
    manifest["skipped"] = skipped + backgrounds.skipped
    write_text_atomically(os.path.join(folder, MANIFEST_FILE), json.dumps(manifest, indent=1))

  write_folder_atomically(out_dir, write)
  return manifest


def _synthesize(args) -> None:
  manifest = synthesize(
    args.clips_dir,
    args.out_dir,
    background_dir=args.background_dir,
    duration_s=args.duration,
    seed=args.seed,
    overwrite=args.overwrite,
  )
  for split, counts in manifest["splits"].items():
    print(f"{split}: {counts['recordings']} recordings, {counts['queries']} queries from {counts['clips_used']} clips")
  for item in manifest["skipped"]:
    print(f"skipped {item.get('split', 'background')} {item['item']}: {item['reason']}")
  print(f"moment set ready at {os.path.abspath(args.out_dir)} ({MANIFEST_FILE} lists what was skipped)")


def _prepare(args) -> None:
  builder = moment_builder.prepare_split(args.annotations, args.audio_dir, args.out_dir, workers=args.workers)
  counts = builder.info.metadata["preparation"]
  written = counts[moment_builder.SPLIT]
  print(
    f"{args.annotations} prepared in {builder.data_path}: {written['clips_written']} recordings, "
    f"{written['captions_written']} queries (the summary counts recordings as clips, queries as captions)"
  )
  print(extraction.format_summary(builder.name, counts))
  print(f"report of every skipped recording and query and every note: {clip_builder.report_path(builder)}")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m data_pipelines.moments", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  command = commands.add_parser("synthesize", help="a Clotho-Moment-style set from a Clotho-layout clip folder")
  command.add_argument("--clips_dir", required=True, help="captioned clips in any Clotho layout")
  command.add_argument("--out_dir", required=True, help="the folder to write (recordings, JSONL, synthesis.json)")
  command.add_argument("--background_dir", default=None, help="long recordings to cut backgrounds from")
  command.add_argument("--duration", type=int, default=CLOTHO_MOMENT_SECONDS, help="recording length in seconds")
  command.add_argument("--seed", type=int, default=0)
  command.add_argument("--overwrite", action="store_true", help="replace a non-empty --out_dir")
  command = commands.add_parser("prepare", help="TFRecords of one split's recordings with their queries")
  command.add_argument("--annotations", required=True, help="lighthouse JSONL or CASTELLA JSON of one split")
  command.add_argument("--audio_dir", required=True, help="the split's recordings, <vid>.<ext>")
  command.add_argument("--out_dir", default=None, help="default: prepared/ beside the annotations")
  command.add_argument("--workers", type=int, default=None, help="decoding processes (default: one per core)")
  args = parser.parse_args(argv)
  try:
    if args.command == "prepare":
      _prepare(args)
    else:
      _synthesize(args)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
