"""Retrieval-metric benchmark at DCASE and large scale on random unit embeddings (precomputed: no model).

For each size it times `retrieval_metrics` next to its floor, the bare similarity products of the same blocks
(`metrics.score_blocks`, captions x clips and clips x captions, nothing else), in the same run, and reports the
peak memory: the metric's own allocations (tracemalloc, on top of the embeddings) and the process's max RSS.

python -m scripts.benchmark_eval [--sizes=5225x1045,200000x50000] [--dim=1024] [--repeats=3]
"""

import functools
import resource
import time
import tracemalloc

import numpy as np
from absl import app, flags

from atr_jax import metrics

_SIZES = flags.DEFINE_list("sizes", ["5225x1045", "200000x50000"], "Sizes as CAPTIONSxCLIPS.")
_DIM = flags.DEFINE_integer("dim", 1024, "Embedding dimension.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per size below 10^9 scores (best kept); larger: 1.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")


def _unit_embeddings(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
  x = rng.standard_normal((n, dim), dtype=np.float32)
  for start in range(0, n, 8192):  # In place, by chunks: no float64 or full-size temporaries.
    chunk = x[start : start + 8192]
    chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
  return x


def _retrieval_set(rng: np.random.Generator, n_text: int, n_audio: int, dim: int):
  """Every clip gets n_text // n_audio captions, the remainder goes to random clips; caption rows shuffled."""
  per_clip = np.full(n_audio, n_text // n_audio)
  per_clip[rng.choice(n_audio, n_text % n_audio, replace=False)] += 1
  text_to_audio = rng.permutation(np.repeat(np.arange(n_audio), per_clip))
  return _unit_embeddings(rng, n_audio, dim), _unit_embeddings(rng, n_text, dim), text_to_audio


def _floor(audio: np.ndarray, text: np.ndarray, text_to_audio: np.ndarray) -> None:
  """The products retrieval_metrics computes, block by block, and nothing else."""
  for _ in metrics.score_blocks(text, audio):
    pass
  for _ in metrics.score_blocks(audio, text, query_rows=np.unique(text_to_audio)):
    pass


def _best_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def _parse_size(size: str) -> tuple[int, int]:
  try:
    n_text, n_audio = (int(n) for n in size.lower().split("x"))
  except ValueError:
    raise app.UsageError(f"--sizes: {size!r} is not CAPTIONSxCLIPS (e.g. 5225x1045)") from None
  if n_text < n_audio or n_audio < 1:
    raise app.UsageError(f"--sizes: {size!r} needs at least one caption per clip")
  return n_text, n_audio


def main(argv):
  del argv
  rng = np.random.default_rng(_SEED.value)
  rows = [
    "| captions x clips (dim) | floor: products (s) | retrieval_metrics (s) | ratio | metric peak (MB) "
    "| max RSS (MB) |",
    "|---|---|---|---|---|---|",
  ]
  for size in _SIZES.value:
    n_text, n_audio = _parse_size(size)
    audio, text, text_to_audio = _retrieval_set(rng, n_text, n_audio, _DIM.value)
    repeats = _REPEATS.value if n_text * n_audio < 10**9 else 1
    floor = _best_time(functools.partial(_floor, audio, text, text_to_audio), repeats)
    tracemalloc.start()
    elapsed = _best_time(functools.partial(metrics.retrieval_metrics, audio, text, text_to_audio), repeats)
    metric_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    rows.append(
      f"| {n_text:,} x {n_audio:,} ({_DIM.value}) | {floor:.2f} | {elapsed:.2f} | {elapsed / floor:.2f} "
      f"| {metric_peak / 2**20:.0f} | {max_rss:.0f} |"
    )
    print(rows[-1], flush=True)
    del audio, text
  print("\n".join(rows))


if __name__ == "__main__":
  app.run(main)
