"""Retrieval latency: one text query against an index of N clips, end to end (tokenize, text tower, similarity,
top-k) as `python -m atr_jax.retrieve text` serves it, with the workdir load time apart; with --index_files, the
peak memory (RSS) of indexing folders of that many noise clips (`atr_jax.retrieve.index_folder`).

python -m scripts.benchmark_retrieval --config configs/demo.py [--num_clips 10000] [--repeats 20]
python -m scripts.benchmark_retrieval --workdir runs/demo   # a trained workdir instead of fresh weights
python -m scripts.benchmark_retrieval --config configs/demo.py --index_files 1000,5000 [--clip_s 1] [--batch_size 16]

With --config, a workdir holding the config's freshly initialised model is made in a temporary folder (latency and
memory do not depend on the weights). The index holds random unit embeddings of the model's dimension. Folders are
indexed in this process once the model is loaded, each after resetting the peak RSS (Linux), so the table shows what
indexing itself needs (the decoding worker processes, one clip each, are not counted).
"""

from atr_jax import xla_flags

xla_flags.set_defaults()  # Before jax is imported.

import ctypes  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from atr_jax import checkpointing, sharding  # noqa: E402
from atr_jax.models import weights  # noqa: E402
from atr_jax.models.dual_encoder import build_model  # noqa: E402
from atr_jax.api import Model, ranked_top_k  # noqa: E402
from atr_jax.retrieve import index_folder  # noqa: E402
from atr_jax.train_state import create_train_state, make_optimizer  # noqa: E402
from data_pipelines import features  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config whose model is benchmarked (fresh weights).", lock_config=True
)
_NUM_CLIPS = flags.DEFINE_integer("num_clips", 10000, "Clips in the index.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed queries after 3 warm-up queries.")
_INDEX_FILES = flags.DEFINE_list(
  "index_files", [], "Also index folders of this many noise clips (e.g. 1000,5000) and print each run's peak RSS."
)
_CLIP_S = flags.DEFINE_float("clip_s", 1.0, "--index_files: seconds per clip.")
_QUERY = "a dog barks"


def _fresh_workdir(config) -> str:
  workdir = tempfile.mkdtemp(prefix="atr_jax_retrieval_bench_")
  config.model.audio.init_from = weights.SCRATCH  # Fresh weights.
  model = build_model(config.model)
  tx, _ = make_optimizer(config.optim, steps_per_epoch=1)
  state, _ = create_train_state(config, model, tx, sharding.create_mesh(), jax.random.key(0, impl="rbg"))
  manager = checkpointing.create_manager(workdir, config.eval.selection_metric)
  checkpointing.save(manager, 0, state, {config.eval.selection_metric: 0.0})
  with open(os.path.join(workdir, checkpointing.CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort())
  return workdir


def _rss_mib(field: str) -> float:
  """VmRSS (now) or VmHWM (peak since the start or the last reset) of this process, in MiB (Linux)."""
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _index_memory(retriever: Model, folder: str, num_files: int) -> tuple[float, float, float]:
  """(RSS before, peak RSS while indexing, in MiB; seconds) of `index_folder` over a new folder of `num_files` noise
  clips, in this process with the model loaded and compiled: the peak is reset first (Linux, glibc)."""
  audio_dir = tempfile.mkdtemp(prefix=f"audio_{num_files}_", dir=folder)
  rng = np.random.default_rng(0)
  samples = int(_CLIP_S.value * features.SAMPLE_RATE)
  for number in range(num_files):
    sf.write(os.path.join(audio_dir, f"{number:06d}.wav"), 0.1 * rng.standard_normal(samples), features.SAMPLE_RATE)
  ctypes.CDLL("libc.so.6").malloc_trim(0)  # Hands freed heap back to the OS: RSS counts live memory only.
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # Resets VmHWM to the current RSS.
  before = _rss_mib("VmRSS")
  start = time.perf_counter()
  index_folder(retriever, audio_dir, audio_dir + "_index", flags.FLAGS.batch_size)
  return before, _rss_mib("VmHWM"), time.perf_counter() - start


def main(argv):
  del argv
  trained = flags.FLAGS.workdir  # The flag of atr_jax.retrieve, imported above.
  if bool(trained) == bool(_CONFIG.value):
    raise app.UsageError("give exactly one of --workdir and --config")
  workdir = trained or _fresh_workdir(_CONFIG.value)
  start = time.perf_counter()
  retriever = Model(workdir)
  load_s = time.perf_counter() - start
  rng = np.random.default_rng(0)
  index = rng.standard_normal((_NUM_CLIPS.value, retriever.config.model.embed_dim)).astype(np.float32)
  index /= np.linalg.norm(index, axis=1, keepdims=True)
  end_to_end, search = [], []
  for i in range(3 + _REPEATS.value):
    start = time.perf_counter()
    query = retriever.embed_text([_QUERY])[0]
    middle = time.perf_counter()
    ranked_top_k(index, query, 10)
    end = time.perf_counter()
    if i >= 3:
      end_to_end.append(end - start)
      search.append(end - middle)
  print(json.dumps({"workdir": workdir}))
  print(
    f"| clips | embed dim | text tower | load s | query ms (median) | of which top-10 search ms |\n"
    f"|---|---|---|---|---|---|\n"
    f"| {_NUM_CLIPS.value} | {retriever.config.model.embed_dim} | "
    f"{retriever.config.model.text.model_dir.rstrip('/').split('/')[-2:][0]} | {load_s:.1f} | "
    f"{1e3 * np.median(end_to_end):.1f} | {1e3 * np.median(search):.2f} |"
  )
  if _INDEX_FILES.value:
    with tempfile.TemporaryDirectory(prefix="atr_jax_index_bench_") as folder:
      _index_memory(retriever, folder, 16)  # Compiles the embedding step outside the measurements.
      rows = [(n, *_index_memory(retriever, folder, n)) for n in map(int, _INDEX_FILES.value)]
    print(
      "\n| files | clip s | batch | RSS before MiB | peak RSS MiB | peak - before MiB | index s | files/s |\n"
      "|---|---|---|---|---|---|---|---|"
    )
    for num_files, before, peak, seconds in rows:
      print(
        f"| {num_files} | {_CLIP_S.value:g} | {flags.FLAGS.batch_size} | {before:.0f} | {peak:.0f} | "
        f"{peak - before:.0f} | {seconds:.1f} | {num_files / seconds:.0f} |"
      )


if __name__ == "__main__":
  app.run(main)
