"""Training-step benchmark: ours (the jitted `train.train_step`) and, with --torch, the PyTorch reference step of
scripts/torch_reference.py at the same sizes (batch, frames, tokens, tower widths, BERT config, loss, Adam), side by
side in one markdown table: init and compile time, step time (median of repeated steps after warm-up), pairs/s,
peak memory and our time over PyTorch's. Inputs are random log-mels and token ids (no dataset needed), identical for
both frameworks.

Each framework runs in its own subprocess (`--worker`), so that peak memory is measured apart (CPU: the process's
peak RSS; GPU: the device's peak bytes in use) and XLA's and torch's thread pools do not compete; torch uses
`os.cpu_count()` threads. Ours runs with our entry points' process defaults (atr_jax.xla_flags: XLA flags and the
glibc malloc setting that stops page-faulting fresh memory every step), PyTorch with its own; --torch_keep_freed_memory
adds a PyTorch row with the same malloc setting. After set-up and warm-up, the workers take turns of
--steps_per_round timed steps, so that on a shared machine all see the same load.

python -m scripts.benchmark_train --config configs/clotho_infonce.py --bert_base --torch \
    --config.train.global_batch_size=8 --config.data.train_max_frames=1001 --config.loss.name=ntxent
"""

import sys

from atr_jax import xla_flags

# Before numpy starts threads or jax loads: our entry points' process defaults for ours, and for the extra PyTorch
# row (--torch_keep_freed_memory) the same C allocator setting.
if "--worker=jax" in sys.argv:
  xla_flags.set_defaults()
elif "--worker=torch_keep_freed_memory" in sys.argv:
  xla_flags.keep_freed_memory()

import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Callable, NamedTuple  # noqa: E402

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps of each framework, after the warm-up steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first (ours: after compilation).")
_STEPS_PER_ROUND = flags.DEFINE_integer("steps_per_round", 2, "The frameworks take turns, this many steps each.")
_TORCH = flags.DEFINE_bool("torch", False, "Also time the PyTorch reference step, in the same run.")
_TORCH_KEEP_FREED_MEMORY = flags.DEFINE_bool(
  "torch_keep_freed_memory",
  False,
  "With --torch, one more PyTorch row that runs with our glibc malloc setting "
  "(atr_jax.xla_flags.keep_freed_memory), to show how much of the difference is the C allocator.",
)
_BERT_BASE = flags.DEFINE_bool(
  "bert_base",
  False,
  "Text tower: a randomly initialised BERT of bert-base-uncased shape (hidden 768, 12 layers, "
  "12 heads, intermediate 3072, vocab 30522) in place of model.text.model_dir.",
)
_WORKER = flags.DEFINE_enum(
  "worker",
  None,
  ["jax", "torch", "torch_keep_freed_memory"],
  "Internal: serve one framework's step to the parent process over stdin/stdout.",
)

_REPLY_PREFIX = "BENCHMARK_WORKER "
_BERT_BASE_UNCASED = {  # The architecture keys of bert-base-uncased's config.json.
  "architectures": ["BertForMaskedLM"],
  "model_type": "bert",
  "vocab_size": 30522,
  "hidden_size": 768,
  "num_hidden_layers": 12,
  "num_attention_heads": 12,
  "intermediate_size": 3072,
  "hidden_act": "gelu",
  "max_position_embeddings": 512,
  "type_vocab_size": 2,
  "layer_norm_eps": 1e-12,
  "hidden_dropout_prob": 0.1,
  "attention_probs_dropout_prob": 0.1,
  "initializer_range": 0.02,
  "pad_token_id": 0,
}


def _text_json(config: ml_collections.ConfigDict) -> dict:
  path = os.path.join(os.path.expanduser(config.model.text.model_dir), "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.model.text.model_dir: no {path} (pass --bert_base for a random bert-base)")
  with open(path) as f:
    return json.load(f)


def _use_random_bert_base(config: ml_collections.ConfigDict, folder: str) -> None:
  """Points the config at a random-weight BERT of bert-base-uncased shape: its config.json written into `folder`."""
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(_BERT_BASE_UNCASED, f, indent=2)
  config.model.text.model_dir = folder
  config.model.text.pretrained = False


def _random_batch(config: ml_collections.ConfigDict) -> dict:
  """Numpy inputs of one global batch: random log-mels, all frames valid, random token ids, two captions per
  clip."""
  rng = np.random.default_rng(0)
  b, t, tokens = config.train.global_batch_size, config.data.train_max_frames, config.model.text.max_len
  if t < 1:
    raise ValueError(
      "config.data.train_max_frames must be set (e.g. 1001 for 10 s crops): the benchmark has no "
      "dataset to take the longest clip from"
    )
  return {
    "log_mel": (rng.standard_normal((b, t, 64)) * 10 - 40).astype(np.float32),
    "frame_mask": np.ones((b, t), bool),
    "input_ids": rng.integers(1, _text_json(config)["vocab_size"], (b, tokens)).astype(np.int32),
    "attention_mask": np.ones((b, tokens), np.int32),
    "clip_id": np.arange(b, dtype=np.int32) // 2,
  }


class _Bench(NamedTuple):
  """One framework's step, ready to time: `info` (name, device, dtype, init_s, compile_s), `run_step` (returns
  once the step is done) and `finish` (-> peak_bytes, peak_kind, loss of the last step)."""

  info: dict
  run_step: Callable[[], None]
  finish: Callable[[], dict]


def _timed(run_step, count: int) -> list[float]:
  times = []
  for _ in range(count):
    start = time.perf_counter()
    run_step()
    times.append(time.perf_counter() - start)
  return times


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB.


def _setup_jax(config: ml_collections.ConfigDict) -> _Bench:
  # Imported here, so that the torch worker holds no jax (nor the TensorFlow that atr_jax.train imports).
  import functools
  import jax
  from atr_jax import losses, sharding
  from atr_jax.models import panns
  from atr_jax.models.dual_encoder import build_model
  from atr_jax.train import train_step
  from atr_jax.train_state import create_train_state, make_optimizer

  config.model.audio.init_from = panns.SCRATCH  # Fresh weights: the step's cost does not depend on their values.
  start = time.perf_counter()
  mesh = sharding.create_mesh()
  model = build_model(config.model)
  tx, _ = make_optimizer(config.optim, steps_per_epoch=1000)
  state, shardings = create_train_state(config, model, tx, mesh, jax.random.key(0, impl="rbg"))
  jax.block_until_ready(state)
  init_s = time.perf_counter() - start
  loss_fn = losses.make_loss_fn_from_config(config.loss, mesh)
  step = jax.jit(
    functools.partial(train_step, loss_fn=loss_fn, rng=jax.random.key(1)),
    in_shardings=(shardings, sharding.batch_sharding(mesh)),
    out_shardings=(shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )
  rows = config.train.global_batch_size // jax.process_count()  # This process's slice of the global batch.
  local = {
    k: v[jax.process_index() * rows : (jax.process_index() + 1) * rows] for k, v in _random_batch(config).items()
  }
  batch = sharding.global_batch(local, mesh)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  carry = {"state": state}

  def run_step():
    carry["state"], carry["metrics"] = compiled(carry["state"], batch)
    jax.block_until_ready(carry)

  def finish():
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    peak = _peak_rss_bytes() if on_cpu else (device.memory_stats() or {}).get("peak_bytes_in_use", 0)
    return {"peak_bytes": peak, "peak_kind": "RSS" if on_cpu else "device", "loss": float(carry["metrics"]["loss"])}

  device = jax.devices()[0]
  info = {
    "name": "ours (JAX)",
    "device": f"{jax.device_count()} {device.device_kind}",
    "dtype": config.model.dtype,
    "init_s": init_s,
    "compile_s": compile_s,
  }
  return _Bench(info, run_step, finish)


def _setup_torch(config: ml_collections.ConfigDict, name: str = "PyTorch") -> _Bench:
  import torch
  from scripts import torch_reference

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(config.seed)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  start = time.perf_counter()
  step = torch_reference.build_from_config(config)
  step.model.to(device)
  init_s = time.perf_counter() - start
  batch = {k: torch.from_numpy(v).to(device) for k, v in _random_batch(config).items()}
  losses = []

  def run_step():  # The step returns python floats: it is done.
    losses.append(step(batch["log_mel"], batch["input_ids"], batch["attention_mask"], batch["clip_id"])[0])

  on_cpu = device.type == "cpu"

  def finish():
    peak = _peak_rss_bytes() if on_cpu else torch.cuda.max_memory_allocated()
    return {"peak_bytes": peak, "peak_kind": "RSS" if on_cpu else "device", "loss": losses[-1]}

  threads = f"{torch.get_num_threads()} threads" if on_cpu else torch.cuda.get_device_name()
  info = {"name": name, "device": f"{device.type} ({threads})", "dtype": "float32", "init_s": init_s, "compile_s": None}
  return _Bench(info, run_step, finish)


def _reply(message: dict) -> None:
  print(_REPLY_PREFIX + json.dumps(message), flush=True)


def _serve(bench: _Bench, warmup: int) -> None:
  """The worker's side: warm up, send `info`, then answer 'steps N' with the N step times and 'finish' with the
  final figures."""
  _timed(bench.run_step, warmup)
  _reply(bench.info)
  for line in sys.stdin:
    command, _, count = line.strip().partition(" ")
    if command == "steps":
      _reply({"times": _timed(bench.run_step, int(count))})
    elif command == "finish":
      _reply(bench.finish())
      return


class _Worker:
  """The parent's side of one worker process (this script with --worker=framework), set up and warmed up."""

  def __init__(self, framework: str):
    self.framework = framework
    command = [sys.executable, "-m", "scripts.benchmark_train", *sys.argv[1:], f"--worker={framework}"]
    self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.info = self._read()

  def _read(self) -> dict:
    for line in self.process.stdout:
      if line.startswith(_REPLY_PREFIX):
        return json.loads(line[len(_REPLY_PREFIX) :])
    raise RuntimeError(
      f"the {self.framework} worker exited (status {self.process.wait()}) without replying; its errors are above"
    )

  def ask(self, command: str) -> dict:
    self.process.stdin.write(command + "\n")
    self.process.stdin.flush()
    return self._read()


def measure(frameworks: list[str], warmup: int, repeats: int, steps_per_round: int) -> list[dict]:
  """Starts one worker per framework (one after the other), then times rounds of `steps_per_round` steps of each
  in turn, so that every framework sees the same machine load; -> per framework: info, times, peak, loss."""
  workers = [_Worker(framework) for framework in frameworks]
  times = {worker.framework: [] for worker in workers}
  for start in range(0, repeats, steps_per_round):
    for worker in workers:
      times[worker.framework] += worker.ask(f"steps {min(steps_per_round, repeats - start)}")["times"]
  results = [{**worker.info, "times": times[worker.framework], **worker.ask("finish")} for worker in workers]
  for worker in workers:
    worker.process.wait()
  return results


def format_table(config: ml_collections.ConfigDict, results: list[dict]) -> str:
  """One markdown row per framework; the last column is each step time over the PyTorch one (when present)."""
  text = _text_json(config)
  text_shape = f"{text['num_hidden_layers']}x{text['hidden_size']}"
  reference = next((np.median(r["times"]) for r in results if r["name"] == "PyTorch"), None)
  rows = [
    "| framework | device | dtype | batch | frames | tokens | text layers x width | init s | compile s | "
    "step s median (min-max) | pairs/s | peak memory GB | time / PyTorch |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  batch = config.train.global_batch_size
  for r in results:
    median = float(np.median(r["times"]))
    compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
    ratio = "-" if reference is None else f"{median / reference:.2f}"
    rows.append(
      f"| {r['name']} | {r['device']} | {r['dtype']} | {batch} | {config.data.train_max_frames} | "
      f"{config.model.text.max_len} | {text_shape} | {r['init_s']:.1f} | {compile_s} | "
      f"{median:.3f} ({min(r['times']):.3f}-{max(r['times']):.3f}) | {batch / median:.1f} | "
      f"{r['peak_bytes'] / 1e9:.2f} ({r['peak_kind']}) | {ratio} |"
    )
  return "\n".join(rows)


def main(argv):
  del argv
  config = _CONFIG.value
  with tempfile.TemporaryDirectory() as folder:
    if _BERT_BASE.value:
      _use_random_bert_base(config, folder)
    if _WORKER.value is not None:
      setups = {
        "jax": _setup_jax,
        "torch": _setup_torch,
        "torch_keep_freed_memory": lambda c: _setup_torch(c, "PyTorch + keep_freed_memory"),
      }
      _serve(setups[_WORKER.value](config), _WARMUP.value)
      return
    frameworks = ["jax"] + (["torch"] if _TORCH.value else [])
    frameworks += ["torch_keep_freed_memory"] if _TORCH.value and _TORCH_KEEP_FREED_MEMORY.value else []
    print(format_table(config, measure(frameworks, _WARMUP.value, _REPEATS.value, _STEPS_PER_ROUND.value)), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
