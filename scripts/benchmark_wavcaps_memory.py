"""Read passes, wall time and peak memory of embedding a WavCaps-shaped split, at two longest-clip durations.

Evaluation, validation and `retrieve embed-train` embed a split's clips with `evaluation.embed_split`; its audio half
(`input_pipeline.eval_clip_batches` -> `evaluation.embed_segment_batches`) is what this measures, on a generated set
in WavCaps' native layout (json_files/<source>/*_final.json + Audio/<source>/<id>.flac, prepared as log-mel
records): --num_clips FreeSound clips of log-uniform --min_s to --short_max_s seconds (most of WavCaps) and
--long_clips BBC_Sound_Effects clips of --max_s seconds each (BBC Sound Effects runs to tens of minutes), noise audio.

For each --max_s, each step runs in a process of its own (so that its peak RSS is its own):
- read: the evaluation batches alone (records read, decoded, cut into segments, batched, padded);
- embed: those batches through a narrow random CNN14 and its head (the model's width does not change the memory
  the data path holds; --channels), eval.batch_size --batch_size, eval.max_segment_s --max_segment_s.
A step runs once to warm up (compilation included: "first pass"), then --repeats times ("median pass"). "reads /
record" counts the records the step's passes read (wrapping the builder's record reading) per record and pass;
"old passes" is what the code before the one-pass reading read: the split once per padded length, and "old tower
input" the padded length of the longest clip, which that code embedded whole.

python -m scripts.benchmark_wavcaps_memory [--num_clips=2000] [--long_clips=4] [--max_s=60,600] [--repeats=3]
"""

import collections
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

_NUM_CLIPS = flags.DEFINE_integer("num_clips", 2000, "Short (FreeSound) clips.")
_LONG_CLIPS = flags.DEFINE_integer("long_clips", 4, "Clips of --max_s seconds (BBC_Sound_Effects).")
_MIN_S = flags.DEFINE_float("min_s", 2.0, "Shortest clip (s).")
_SHORT_MAX_S = flags.DEFINE_float("short_max_s", 30.0, "Longest short clip (s).")
_MAX_S = flags.DEFINE_list("max_s", ["60", "600"], "Durations of the long clips (s), one set each.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "eval.batch_size.")
_MAX_SEGMENT_S = flags.DEFINE_float("max_segment_s", 30.0, "eval.max_segment_s.")
_CHANNELS = flags.DEFINE_list("channels", ["8", "16", "32", "64", "128", "256"], "CNN14 ConvBlock widths.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes after the warm-up pass.")
_CACHE_DIR = flags.DEFINE_string(
  "cache_dir", os.path.expanduser("~/.cache/atr_jax/benchmark_wavcaps"), "Where the sets are generated."
)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of the durations and the audio.")
_STEP = flags.DEFINE_enum("step", None, ["read", "embed"], "Internal: run one step on --data_dir and print JSON.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Internal: the prepared set of --step.")

SAMPLE_RATE = 32000
SOURCES = {"FreeSound": "fsd_final.json", "BBC_Sound_Effects": "bbc_final.json"}


def durations(max_s: float) -> dict[str, np.ndarray]:
  """Seconds of every clip of the set, per source."""
  rng = np.random.default_rng(_SEED.value)
  short = np.exp(rng.uniform(np.log(_MIN_S.value), np.log(_SHORT_MAX_S.value), _NUM_CLIPS.value))
  return {"FreeSound": np.round(short, 2), "BBC_Sound_Effects": np.full(_LONG_CLIPS.value, max_s)}


def write_raw(raw_dir: str, max_s: float) -> None:
  """The WavCaps native layout, one noise FLAC per JSON entry (skipped when the folder is complete)."""
  import soundfile as sf

  done = os.path.join(raw_dir, ".complete")
  if os.path.exists(done):
    return
  rng = np.random.default_rng(_SEED.value + 1)
  for source, seconds in durations(max_s).items():
    audio_dir = os.path.join(raw_dir, "Audio", source)
    os.makedirs(audio_dir, exist_ok=True)
    os.makedirs(os.path.join(raw_dir, "json_files", source), exist_ok=True)
    entries = []
    for number, duration in enumerate(seconds):
      clip_id = f"{source[:3].lower()}{number:06d}"
      samples = int(round(duration * SAMPLE_RATE))
      envelope = np.repeat(rng.uniform(0.05, 0.5, -(-samples // SAMPLE_RATE)), SAMPLE_RATE)[:samples]
      wave = (rng.standard_normal(samples) * envelope).astype(np.float32)
      sf.write(os.path.join(audio_dir, f"{clip_id}.flac"), np.clip(wave, -1, 1), SAMPLE_RATE, subtype="PCM_16")
      entries.append({"id": clip_id, "caption": f"noise number {number} of {source}", "duration": float(duration)})
    with open(os.path.join(raw_dir, "json_files", source, SOURCES[source]), "w") as f:
      json.dump({"data": entries}, f)
  open(done, "w").close()


def _counted(builder, reads: collections.Counter):
  """Makes `builder.as_dataset` count the records it yields, by clip id, into `reads`."""
  import tensorflow as tf

  as_dataset = builder.as_dataset

  def count(clip_id):
    reads[int(clip_id)] += 1
    return clip_id

  def counted(*args, **kwargs):
    return as_dataset(*args, **kwargs).map(
      lambda clip: {**clip, "clip_id": tf.ensure_shape(tf.numpy_function(count, [clip["clip_id"]], tf.int32), ())}
    )

  builder.as_dataset = counted


def run_step(step: str, data_dir: str) -> dict:
  """One step (read or embed) over the prepared set in `data_dir`: passes, times, reads and peak RSS."""
  from data_pipelines import audio_forms, input_pipeline, wavcaps

  input_pipeline.leave_accelerators_to_jax()
  builder = wavcaps.WavCaps(data_dir=data_dir, config=wavcaps.WavCaps.config_for(""))
  frames = input_pipeline.eval_clip_frames(builder, "train")
  segment = input_pipeline.max_segment_frames(_MAX_SEGMENT_S.value, audio_forms.LOG_MEL)
  reads = collections.Counter()
  _counted(builder, reads)

  def batches():
    return input_pipeline.eval_clip_batches(builder, "train", batch_size=_BATCH_SIZE.value, max_segment_frames=segment)

  if step == "read":
    one_pass = lambda: sum(1 for _ in batches())  # noqa: E731
  else:
    import jax
    import jax.numpy as jnp

    from atr_jax import evaluation, sharding
    from atr_jax.models.bert import minilm_dir
    from atr_jax.models.dual_encoder import build_model
    from configs.base import get_base_config

    config = get_base_config().model
    config.audio.channels = tuple(int(c) for c in _CHANNELS.value)
    config.text.model_dir = minilm_dir()  # Only its config.json is read: the text tower is not initialised.
    model = build_model(config)
    example = jnp.zeros((1, 64, 64)), jnp.ones((1, 64), bool)
    variables = model.init(jax.random.key(0), *example, method=lambda m, a, k: m.embed_audio(a, k, False))
    embedder = evaluation.Embedder(model, sharding.create_mesh(), max_segment_s=_MAX_SEGMENT_S.value)
    counts = input_pipeline.segment_counts(frames, segment)
    one_pass = lambda: evaluation.embed_segment_batches(  # noqa: E731
      embedder, variables, batches(), counts, global_batch_size=_BATCH_SIZE.value
    )
  times = []
  for _ in range(1 + _REPEATS.value):
    start = time.perf_counter()
    one_pass()
    times.append(time.perf_counter() - start)
  return {
    "clips": len(frames),
    "hours": float(frames.sum()) / 100 / 3600,
    "longest_s": float(frames.max()) / 100,
    "reads_per_record": sum(reads.values()) / len(frames) / len(times),
    "reads_exact": set(reads) == set(range(len(frames))) and set(reads.values()) == {len(times)},
    "old_passes": len({input_pipeline.padded_frames(int(n)) for n in frames}),
    "tower_input": int(input_pipeline.segment_buckets(frames, segment).max()),
    "old_tower_input": input_pipeline.padded_frames(int(frames.max())),
    "first_s": times[0],
    "median_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
    "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KB on Linux
  }


def main(argv):
  del argv
  if _STEP.value:
    print(json.dumps(run_step(_STEP.value, _DATA_DIR.value)))
    return
  from data_pipelines import wavcaps

  rows = [
    "| longest clip | clips (hours) | step | reads / record | old passes | tower input (frames): now / old "
    "| first pass (s) | median pass (s) | peak RSS (MB) |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for max_s in (float(value) for value in _MAX_S.value):
    name = f"n{_NUM_CLIPS.value}-l{_LONG_CLIPS.value}-{_MIN_S.value:g}-{_SHORT_MAX_S.value:g}-{max_s:g}-s{_SEED.value}"
    raw_dir, data_dir = (os.path.join(_CACHE_DIR.value, name, part) for part in ("WavCaps", "prepared"))
    write_raw(raw_dir, max_s)
    wavcaps.prepare(raw_dir, data_dir)
    for step in ("read", "embed"):
      flags_of_run = [f"--{flag.name}={flag.serialize().split('=', 1)[1]}" for flag in _run_flags()]
      command = [sys.executable, "-m", "scripts.benchmark_wavcaps_memory", f"--step={step}", f"--data_dir={data_dir}"]
      result = subprocess.run(command + flags_of_run, capture_output=True, text=True)
      if result.returncode:
        sys.exit(f"the {step} step failed:\n{result.stderr[-3000:]}")
      r = json.loads(result.stdout.strip().splitlines()[-1])
      if not r["reads_exact"]:
        sys.exit(f"the {step} step did not read every record exactly once per pass: {r}")
      rows.append(
        f"| {r['longest_s']:.0f} s | {r['clips']:,} ({r['hours']:.2f}) | {step} | {r['reads_per_record']:g} "
        f"| {r['old_passes']} | {r['tower_input']:,} / {r['old_tower_input']:,} | {r['first_s']:.2f} "
        f"| {r['median_s']:.2f} | {r['max_rss_mb']:.0f} |"
      )
      print(rows[-1], flush=True)
  print("\n".join(rows))


def _run_flags():
  """The flags a step's process needs from this one."""
  return [flags.FLAGS[name] for name in ("batch_size", "max_segment_s", "channels", "repeats")]


if __name__ == "__main__":
  app.run(main)
