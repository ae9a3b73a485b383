"""A procedurally synthesised captioned sound dataset in the exact Clotho v2.1 layout (for tests and smoke runs).

`generate` writes `clotho_captions_{development,validation,evaluation}.csv` (`file_name,caption_1..caption_5`) and
the folders `development/`, `validation/`, `evaluation/` of 32 kHz mono 16-bit wavs, a few seconds each.

Attribute space. A clip holds one or two *events*, each an event kind at a pitch, repeated `count` times:
- kind (7): beep (pure tone), rising whistle and falling whistle (one-octave sweeps), noise burst (band-passed
  noise), knock (damped resonance with a click), buzz (harmonic tone), warble (bird-like fast vibrato);
- pitch (3): low / mid / high, centred on 250 / 1000 / 4000 Hz (two octaves apart; +-12 % jitter per clip);
- count: 1-4 for a one-event clip; 1-3 for each of the two events of a two-event clip, where event A plays
  (all its repetitions) before event B, and (kind, pitch) of A and B differ;
- loudness over the clip: getting louder / getting quieter (a 14 dB ramp) / steady (a lone knock is always steady);
- background: silence or faint white noise (RMS about -40 dB below the event peaks).
Each clip gets 5 captions from 5 different sentence templates with random synonyms; every caption names kind,
pitch and count of every event, their order, and the loudness change (the background only sometimes), so matching a
caption to its clip needs several attributes at once. Timing, durations, frequencies and gains are jittered so equal
attribute sets give different waveforms; each clip is peak-normalised to 0.5-0.9.

Everything is drawn from a numpy Generator seeded by (seed, split, clip index): same seed, byte-identical files.
Usage: python -m data_pipelines.synthetic --out_dir DIR [--num_development 1000 --num_validation 200
--num_evaluation 200 --seed 0 --duration 3.0 --overwrite]

`write_esc50` (`--esc50_out DIR [--clips_per_fold 2 --duration 5.0]`) writes a zero-shot classification set in the
ESC-50 layout instead: one class per event kind, 5 folds, one-event clips (for `python -m atr_jax.zeroshot`).
"""

import argparse
import csv
import dataclasses
import os
import shutil
import tempfile
import time

import numpy as np
import soundfile as sf

from data_pipelines.features import SAMPLE_RATE

SPLITS = ("development", "validation", "evaluation")
CSV_HEADER = ("file_name",) + tuple(f"caption_{i}" for i in range(1, 6))
ESC50_HEADER = ("filename", "fold", "target", "category", "esc10", "src_file", "take")
ESC50_FOLDS = 5
PITCH_HZ = {"low": 250.0, "mid": 1000.0, "high": 4000.0}
LOUDNESS = ("louder", "quieter", "steady")
BACKGROUNDS = ("silence", "noise")
RAMP_DB = 14.0
BACKGROUND_RMS = 0.01  # Relative to events of unit peak (about -40 dB).

# Per kind: (singular, plural) nouns used in captions.
KIND_NOUNS = {
  "beep": (("beep", "beeps"), ("tone", "tones"), ("bleep", "bleeps"), ("pure tone", "pure tones")),
  "rising whistle": (
    ("rising whistle", "rising whistles"),
    ("upward sweep", "upward sweeps"),
    ("rising glide", "rising glides"),
    ("ascending whistle", "ascending whistles"),
  ),
  "falling whistle": (
    ("falling whistle", "falling whistles"),
    ("downward sweep", "downward sweeps"),
    ("falling glide", "falling glides"),
    ("descending whistle", "descending whistles"),
  ),
  "noise burst": (
    ("noise burst", "noise bursts"),
    ("burst of noise", "bursts of noise"),
    ("whoosh", "whooshes"),
    ("blast of static", "blasts of static"),
  ),
  "knock": (("knock", "knocks"), ("tap", "taps"), ("click", "clicks"), ("rap", "raps")),
  "buzz": (("buzz", "buzzes"), ("hum", "hums"), ("drone", "drones"), ("buzzing tone", "buzzing tones")),
  "warble": (
    ("warble", "warbles"),
    ("bird-like trill", "bird-like trills"),
    ("chirping trill", "chirping trills"),
    ("twitter", "twitters"),
  ),
}
KINDS = tuple(KIND_NOUNS)
PITCH_WORDS = {
  "low": ("low", "low-pitched", "deep"),
  "mid": ("mid-pitched", "medium-pitched", "mid-range"),
  "high": ("high", "high-pitched", "shrill"),
}
COUNT_WORDS = {2: ("two", "a pair of"), 3: ("three",), 4: ("four",)}
TIMES_WORDS = {2: ("twice", "two times"), 3: ("three times", "thrice"), 4: ("four times",)}
LOUDNESS_WORDS = {
  "louder": (
    "getting louder",
    "growing louder",
    "becoming louder and louder",
    "increasing in volume",
    "swelling in volume",
  ),
  "quieter": ("getting quieter", "growing softer", "fading away", "decreasing in volume", "dying down"),
  "steady": ("at a steady volume", "at constant loudness", "at an unchanging volume", "at an even level"),
}
BACKGROUND_WORDS = {
  "silence": (" in silence", " against a silent background", " with no background noise"),
  "noise": (" over faint background static", " with soft noise in the background", " over a quiet noise floor"),
}


@dataclasses.dataclass(frozen=True)
class Event:
  kind: str
  pitch: str
  count: int


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """The attribute record of one clip; `events` play in order."""

  events: tuple[Event, ...]
  loudness: str
  background: str
  length_s: float

  def attributes(self) -> tuple:
    """Everything the captions can describe (all but the exact length)."""
    return self.events, self.loudness, self.background


def _clip_rngs(seed: int, split: str, index: int) -> list[np.random.Generator]:
  """Three independent generators (spec, captions, audio) for one clip."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  children = np.random.SeedSequence([seed, SPLITS.index(split), index]).spawn(3)
  return [np.random.default_rng(child) for child in children]


def clip_spec(seed: int, split: str, index: int, duration_s: float = 3.0) -> ClipSpec:
  """The attributes of clip `index` of `split` (cheap: draws no audio)."""
  rng = _clip_rngs(seed, split, index)[0]
  pitches = tuple(PITCH_HZ)
  if rng.random() < 0.5:
    events = (Event(KINDS[rng.integers(len(KINDS))], pitches[rng.integers(3)], int(rng.integers(1, 5))),)
  else:
    pairs = [(kind, pitch) for kind in KINDS for pitch in pitches]
    first, second = rng.choice(len(pairs), size=2, replace=False)
    events = tuple(Event(*pairs[i], int(rng.integers(1, 4))) for i in (first, second))
  loudness = LOUDNESS[rng.integers(3)]
  if events == (Event("knock", events[0].pitch, 1),):
    loudness = "steady"  # A single knock is too short to change loudness audibly.
  length_s = duration_s + rng.uniform(-1.0, 1.0) * min(0.5, duration_s / 6)
  return ClipSpec(events, loudness, BACKGROUNDS[rng.integers(2)], round(length_s, 3))


def _noun_phrase(event: Event, rng: np.random.Generator) -> tuple[str, bool]:
  """e.g. ('three deep knocks', True) or ('a shrill beep repeated twice', False); the bool says plural."""
  singular, plural = KIND_NOUNS[event.kind][rng.integers(len(KIND_NOUNS[event.kind]))]
  adjective = rng.choice(PITCH_WORDS[event.pitch])
  if event.count == 1:
    text, is_plural = f"{rng.choice(('a', 'one', 'a single'))} {adjective} {singular}", False
  elif rng.random() < 0.6:
    text, is_plural = f"{rng.choice(COUNT_WORDS[event.count])} {adjective} {plural}", True
  else:
    text, is_plural = f"a {adjective} {singular} repeated {rng.choice(TIMES_WORDS[event.count])}", False
  if text.startswith("a ") and text[2] in "aeiou":
    text = "an " + text[2:]
  return text, is_plural


def _verb(is_plural: bool, singular: str, plural: str) -> str:
  return plural if is_plural else singular


# Templates get (a, a_plural, b, b_plural, loud, background) with a, b noun phrases (b is None for one-event clips).
ONE_EVENT_TEMPLATES = (
  lambda a, pl, b, bpl, loud, bg: f"{a} {_verb(pl, 'is', 'are')} heard {loud}{bg}",
  lambda a, pl, b, bpl, loud, bg: f"there {_verb(pl, 'is', 'are')} {a} {loud}{bg}",
  lambda a, pl, b, bpl, loud, bg: f"{a} {_verb(pl, 'plays', 'play')}, {loud}{bg}",
  lambda a, pl, b, bpl, loud, bg: f"{a} {loud}{bg}",
  lambda a, pl, b, bpl, loud, bg: f"you can hear {a} {loud}{bg}",
  lambda a, pl, b, bpl, loud, bg: f"{loud}, {a} {_verb(pl, 'sounds', 'sound')}{bg}",
)
TWO_EVENT_TEMPLATES = (
  lambda a, pl, b, bpl, loud, bg: f"{a} {_verb(pl, 'is', 'are')} followed by {b}, {loud}{bg}",
  lambda a, pl, b, bpl, loud, bg: f"first {a}, then {b}, {loud}{bg}",
  lambda a, pl, b, bpl, loud, bg: f"{b} {_verb(bpl, 'comes', 'come')} after {a}, {loud}{bg}",
  lambda a, pl, b, bpl, loud, bg: f"{a} and afterwards {b}, {loud}{bg}",
  lambda a, pl, b, bpl, loud, bg: f"{loud}, {a} {_verb(pl, 'gives', 'give')} way to {b}{bg}",
  lambda a, pl, b, bpl, loud, bg: f"after {a}, {b} {_verb(bpl, 'plays', 'play')}, {loud}{bg}",
  lambda a, pl, b, bpl, loud, bg: f"{a} {_verb(pl, 'precedes', 'precede')} {b}, {loud}{bg}",
)


def clip_captions(spec: ClipSpec, rng: np.random.Generator) -> list[str]:
  """Five captions of `spec`, each from a different template (so all five differ)."""
  templates = ONE_EVENT_TEMPLATES if len(spec.events) == 1 else TWO_EVENT_TEMPLATES
  captions = []
  for template_index in rng.permutation(len(templates))[:5]:
    a, a_plural = _noun_phrase(spec.events[0], rng)
    b, b_plural = _noun_phrase(spec.events[1], rng) if len(spec.events) == 2 else (None, False)
    loud = rng.choice(LOUDNESS_WORDS[spec.loudness])
    background = rng.choice(BACKGROUND_WORDS[spec.background]) if rng.random() < 0.4 else ""
    text = templates[template_index](a, a_plural, b, b_plural, loud, background)
    captions.append(text[0].upper() + text[1:] + ".")
  return captions


def _band_noise(rng: np.random.Generator, n: int, low_hz: float, high_hz: float) -> np.ndarray:
  """`n` samples of noise band-limited to [low_hz, high_hz] (FFT mask over a power-of-two length)."""
  size = 1 << (n - 1).bit_length()
  spectrum = np.fft.rfft(rng.standard_normal(size))
  freqs = np.fft.rfftfreq(size, 1.0 / SAMPLE_RATE)
  spectrum[(freqs < low_hz) | (freqs > high_hz)] = 0.0
  return np.fft.irfft(spectrum, size)[:n]


def _event_wave(kind: str, f0: float, n: int, rng: np.random.Generator) -> np.ndarray:
  """One event of `n` samples at nominal pitch `f0`, peak about 1."""
  t = np.arange(n) / SAMPLE_RATE
  span = n / SAMPLE_RATE
  phase0 = rng.uniform(0, 2 * np.pi)
  if kind == "beep":
    wave = np.sin(2 * np.pi * f0 * t + phase0)
  elif kind in ("rising whistle", "falling whistle"):  # One octave, centred on f0, exponential sweep.
    start, octaves = (f0 / np.sqrt(2), 1.0) if kind == "rising whistle" else (f0 * np.sqrt(2), -1.0)
    rate = octaves * np.log(2) / span
    wave = np.sin(2 * np.pi * start * np.expm1(rate * t) / rate + phase0)
  elif kind == "noise burst":  # Two octaves of noise around f0.
    wave = _band_noise(rng, n, f0 / 2, f0 * 2)
  elif kind == "knock":  # Damped resonance at f0 plus a short broadband click.
    decay = rng.uniform(0.012, 0.025)
    wave = np.exp(-t / decay) * np.sin(2 * np.pi * f0 * t) + 0.3 * np.exp(-t / 0.002) * rng.standard_normal(n)
    return wave / np.max(np.abs(wave))
  elif kind == "buzz":  # Harmonics k*f0 with amplitude 1/k below 14 kHz.
    harmonics = np.arange(1, max(1, min(8, int(14000 // f0))) + 1)
    phases = rng.uniform(0, 2 * np.pi, len(harmonics))
    wave = (np.sin(2 * np.pi * f0 * t[:, None] * harmonics + phases) / harmonics).sum(axis=1)
  elif kind == "warble":  # +-10 % vibrato at 10-18 Hz.
    rate = rng.uniform(10, 18)
    wave = np.sin(2 * np.pi * f0 * (t - 0.1 / (2 * np.pi * rate) * np.cos(2 * np.pi * rate * t)) + phase0)
  else:
    raise ValueError(f"unknown event kind {kind!r}")
  fade = np.clip(np.minimum(t, span - t) / min(0.01, span / 4), 0.0, 1.0)
  return wave / np.max(np.abs(wave)) * np.sin(0.5 * np.pi * fade) ** 2


def render_clip(spec: ClipSpec, rng: np.random.Generator) -> np.ndarray:
  """The int16 waveform of `spec`: events in equal time slots, a loudness ramp, an optional noise floor."""
  num_samples = int(round(spec.length_s * SAMPLE_RATE))
  audio = np.zeros(num_samples)
  sequence = [event for event in spec.events for _ in range(event.count)]
  start_s, end_s = rng.uniform(0.1, 0.3), spec.length_s - rng.uniform(0.1, 0.3)
  slot_s = (end_s - start_s) / len(sequence)
  frequencies = {(e.kind, e.pitch): PITCH_HZ[e.pitch] * rng.uniform(0.88, 1.12) for e in spec.events}
  for slot, event in enumerate(sequence):
    length_s = min(0.12 if event.kind == "knock" else 1.2, 0.6 * slot_s * rng.uniform(0.6, 1.0))
    onset_s = start_s + slot_s * (slot + rng.uniform(0.0, 0.15))
    first, n = int(onset_s * SAMPLE_RATE), int(length_s * SAMPLE_RATE)
    f0 = frequencies[event.kind, event.pitch] * rng.uniform(0.98, 1.02)
    gain = 10 ** (rng.uniform(-1.0, 1.0) / 20)
    audio[first : first + n] += gain * _event_wave(event.kind, f0, n, rng)
  if spec.loudness != "steady":
    position = np.clip((np.arange(num_samples) / SAMPLE_RATE - start_s) / (end_s - start_s), 0.0, 1.0)
    audio *= 10 ** ((position - 1.0 if spec.loudness == "louder" else -position) * RAMP_DB / 20)
  audio /= np.max(np.abs(audio))
  if spec.background == "noise":
    audio += BACKGROUND_RMS * rng.standard_normal(num_samples)
  audio *= rng.uniform(0.5, 0.9) / np.max(np.abs(audio))
  return np.round(audio * 32767).astype(np.int16)


def make_clip(seed: int, split: str, index: int, duration_s: float = 3.0) -> tuple[ClipSpec, list[str], np.ndarray]:
  """(attribute record, 5 captions, int16 waveform) of clip `index` of `split`."""
  spec = clip_spec(seed, split, index, duration_s)
  _, caption_rng, audio_rng = _clip_rngs(seed, split, index)
  return spec, clip_captions(spec, caption_rng), render_clip(spec, audio_rng)


def clip_file_name(split: str, index: int) -> str:
  return f"synth_{split}_{index:05d}.wav"


def _write_split(root: str, split: str, num: int, seed: int, duration_s: float) -> None:
  os.makedirs(os.path.join(root, split))
  with open(os.path.join(root, f"clotho_captions_{split}.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, quoting=csv.QUOTE_MINIMAL)
    writer.writerow(CSV_HEADER)
    for index in range(num):
      _, captions, audio = make_clip(seed, split, index, duration_s)
      name = clip_file_name(split, index)
      sf.write(os.path.join(root, split, name), audio, SAMPLE_RATE, subtype="PCM_16")
      writer.writerow([name] + captions)


def _write_folder(out_dir: str, overwrite: bool, complete_files: tuple, write) -> None:
  """Calls `write(folder)` on a temporary sibling folder and renames it to `out_dir` once complete. An existing
  non-empty `out_dir` is an error (saying whether it holds all of `complete_files`) unless `overwrite`."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
    complete = all(os.path.exists(os.path.join(out_dir, name)) for name in complete_files)
    raise FileExistsError(
      f"{out_dir} already exists and is not empty"
      f"{' (a complete dataset)' if complete else ''}; pass overwrite=True (--overwrite) "
      "to replace it"
    )
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  partial = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
  os.chmod(partial, 0o755)  # mkdtemp's 0o700 would otherwise become the dataset's permissions.
  try:
    write(partial)
    if os.path.exists(out_dir):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
      os.rename(out_dir, os.path.join(old, "dataset"))
      os.rename(partial, out_dir)
      shutil.rmtree(old)
    else:
      os.rename(partial, out_dir)
  finally:
    if os.path.exists(partial):
      shutil.rmtree(partial)


def generate(
  out_dir: str, num_clips: dict[str, int], seed: int = 0, duration_s: float = 3.0, overwrite: bool = False
) -> None:
  """Writes the dataset into a temporary sibling folder and renames it to `out_dir` once complete.

  `num_clips` maps each of SPLITS to a clip count. An existing non-empty `out_dir` is an error unless `overwrite`.
  """
  if set(num_clips) != set(SPLITS) or any(int(n) < 1 for n in num_clips.values()):
    raise ValueError(f"num_clips must give a positive count for exactly {SPLITS}, got {num_clips}")
  if duration_s < 1.5:
    raise ValueError(f"duration_s must be at least 1.5 s, got {duration_s}")

  def write(partial: str) -> None:
    for split in SPLITS:
      started = time.perf_counter()
      _write_split(partial, split, int(num_clips[split]), seed, duration_s)
      print(f"{split}: {num_clips[split]} clips written ({time.perf_counter() - started:.1f} s)", flush=True)

  _write_folder(out_dir, overwrite, tuple(f"clotho_captions_{s}.csv" for s in SPLITS), write)
  print(f"synthetic Clotho-layout dataset ready at {os.path.abspath(out_dir)}", flush=True)


def esc50_category(kind: str) -> str:
  """The ESC-50-style category name of an event kind (underscores for spaces, as in "crying_baby")."""
  return kind.replace(" ", "_")


def esc50_clip(seed: int, kind: str, index: int, duration_s: float = 5.0) -> tuple[ClipSpec, np.ndarray]:
  """(attribute record, int16 waveform) of clip `index` of class `kind` of the ESC-50-layout output: one event of
  that kind at a random pitch and count, `duration_s` long. Its generators are seeded apart from the Clotho splits'."""
  spec_rng, audio_rng = [
    np.random.default_rng(child)
    for child in np.random.SeedSequence([seed, len(SPLITS), KINDS.index(kind), index]).spawn(2)
  ]
  event = Event(kind, tuple(PITCH_HZ)[spec_rng.integers(3)], int(spec_rng.integers(1, 5)))
  loudness = "steady" if event == Event("knock", event.pitch, 1) else LOUDNESS[spec_rng.integers(3)]
  spec = ClipSpec((event,), loudness, BACKGROUNDS[spec_rng.integers(2)], duration_s)
  return spec, render_clip(spec, audio_rng)


def write_esc50(
  out_dir: str, clips_per_fold: int = 2, seed: int = 0, duration_s: float = 5.0, overwrite: bool = False
) -> None:
  """Writes a zero-shot test set in the ESC-50 layout: `meta/esc50.csv` (filename,fold,target,category,esc10,
  src_file,take) and `audio/{fold}-{src_file}-A-{target}.wav`, one class per event kind (target = its index in
  KINDS), 5 folds of `clips_per_fold` clips per class. Atomic and `overwrite` as `generate`."""
  if clips_per_fold < 1:
    raise ValueError(f"clips_per_fold must be positive, got {clips_per_fold}")
  if duration_s < 1.5:
    raise ValueError(f"duration_s must be at least 1.5 s, got {duration_s}")

  def write(partial: str) -> None:
    os.makedirs(os.path.join(partial, "meta"))
    os.makedirs(os.path.join(partial, "audio"))
    with open(os.path.join(partial, "meta", "esc50.csv"), "w", newline="", encoding="utf-8") as f:
      writer = csv.writer(f)
      writer.writerow(ESC50_HEADER)
      for target, kind in enumerate(KINDS):
        for index in range(ESC50_FOLDS * clips_per_fold):
          fold, source = 1 + index // clips_per_fold, f"synth{target:02d}{index:04d}"
          name = f"{fold}-{source}-A-{target}.wav"
          sf.write(
            os.path.join(partial, "audio", name),
            esc50_clip(seed, kind, index, duration_s)[1],
            SAMPLE_RATE,
            subtype="PCM_16",
          )
          writer.writerow([name, fold, target, esc50_category(kind), "False", source, "A"])

  _write_folder(out_dir, overwrite, (os.path.join("meta", "esc50.csv"),), write)
  print(f"synthetic ESC-50-layout dataset ({len(KINDS)} classes) ready at {os.path.abspath(out_dir)}", flush=True)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  out = parser.add_mutually_exclusive_group(required=True)
  out.add_argument("--out_dir", help="Clotho-layout dataset folder to create")
  out.add_argument("--esc50_out", help="ESC-50-layout zero-shot test set folder to create instead")
  for split, default in zip(SPLITS, (1000, 200, 200)):
    parser.add_argument(f"--num_{split}", type=int, default=default, help=f"clips in the {split} split")
  parser.add_argument("--clips_per_fold", type=int, default=2, help="--esc50_out: clips per class and fold")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--duration", type=float, default=None, help="nominal clip length in seconds (default 3.0 (+-0.5 s); ESC-50: 5.0)"
  )
  parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
  args = parser.parse_args(argv)
  if args.esc50_out:
    write_esc50(args.esc50_out, args.clips_per_fold, args.seed, args.duration or 5.0, args.overwrite)
    return
  generate(
    args.out_dir,
    {split: getattr(args, f"num_{split}") for split in SPLITS},
    seed=args.seed,
    duration_s=args.duration or 3.0,
    overwrite=args.overwrite,
  )


if __name__ == "__main__":
  main()
