"""Input-pipeline benchmark: the (clip, caption) pairs per second that `input_pipeline.train_dataset` delivers as
numpy batches from prepared TFRecords (read, decode, shuffle, crop or pad to max_frames, batch), with no model.

The data is the synthetic Clotho-layout dataset (data_pipelines.synthetic) with clips of --duration_s (about
+-17%), generated and prepared once into --cache_dir. The first epoch is a warm-up (graph building, page cache);
each later epoch is timed from building the dataset to its last batch, as the training loop runs it.

python -m scripts.benchmark_input [--duration_s=10] [--max_frames=1001] [--batch_size=64] [--epochs=3]
"""

from atr_jax import xla_flags

xla_flags.set_defaults()  # The process defaults of the training entry point, which runs this pipeline.

import os  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from data_pipelines import clotho, input_pipeline, synthetic  # noqa: E402

_CACHE_DIR = flags.DEFINE_string("cache_dir", "~/.cache/atr_jax/benchmark_input", "Generated and prepared data.")
_NUM_CLIPS = flags.DEFINE_integer("num_clips", 1000, "Training clips (5 captions each).")
_DURATION_S = flags.DEFINE_float("duration_s", 10.0, "Mean clip duration in seconds.")
_MAX_FRAMES = flags.DEFINE_integer("max_frames", 1001, "Frames per training crop (10 s = 1001).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Pairs per batch.")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Timed epochs after one warm-up epoch.")
_SHUFFLE_BUFFER = flags.DEFINE_integer("shuffle_buffer", 2000, "Pair shuffle buffer (config.data.shuffle_buffer).")

SPLIT = "development"


def prepared_dataset(cache_dir: str, num_clips: int, duration_s: float):
  """The prepared builder of a synthetic dataset of `num_clips` training clips, generated and prepared on first
  use under `cache_dir`."""
  raw_dir = os.path.join(os.path.expanduser(cache_dir), f"synthetic_{num_clips}x{duration_s:g}s")
  if not os.path.isdir(raw_dir):
    synthetic.generate(raw_dir, {"development": num_clips, "validation": 1, "evaluation": 1}, duration_s=duration_s)
  return clotho.prepare(raw_dir, raw_dir + "_prepared")


def time_epoch(builder, epoch: int, *, batch_size: int, max_frames: int, shuffle_buffer: int) -> dict:
  """Pairs, seconds, and seconds to the first batch of one epoch of numpy batches."""
  start = time.perf_counter()
  dataset = input_pipeline.train_dataset(
    [(builder, SPLIT)], batch_size=batch_size, max_frames=max_frames, seed=0, epoch=epoch, shuffle_buffer=shuffle_buffer
  )
  pairs, first_batch_s = 0, None
  for batch in dataset.as_numpy_iterator():
    if first_batch_s is None:
      first_batch_s = time.perf_counter() - start
    if batch["log_mel"].shape != (batch_size, max_frames, 64):
      raise ValueError(f"unexpected batch shape {batch['log_mel'].shape}")
    pairs += batch_size
  return {"pairs": pairs, "seconds": time.perf_counter() - start, "first_batch_s": first_batch_s}


def main(argv):
  del argv
  builder = prepared_dataset(_CACHE_DIR.value, _NUM_CLIPS.value, _DURATION_S.value)
  kwargs = dict(batch_size=_BATCH_SIZE.value, max_frames=_MAX_FRAMES.value, shuffle_buffer=_SHUFFLE_BUFFER.value)
  time_epoch(builder, 0, **kwargs)
  epochs = [time_epoch(builder, epoch, **kwargs) for epoch in range(1, _EPOCHS.value + 1)]
  rates = [e["pairs"] / e["seconds"] for e in epochs]
  print(
    f"| clips | clip s | max frames | batch | pairs/epoch | CPU cores | epoch s median | first batch s median | "
    f"pairs/s median (min-max) |\n|---|---|---|---|---|---|---|---|---|\n"
    f"| {_NUM_CLIPS.value} | {_DURATION_S.value:g} | {_MAX_FRAMES.value} | {_BATCH_SIZE.value} | "
    f"{epochs[0]['pairs']} | {os.cpu_count()} | {np.median([e['seconds'] for e in epochs]):.3f} | "
    f"{np.median([e['first_batch_s'] for e in epochs]):.3f} | {np.median(rates):.0f} "
    f"({min(rates):.0f}-{max(rates):.0f}) |",
    flush=True,
  )


if __name__ == "__main__":
  app.run(main)
