"""Training-step benchmark: ours (the jitted `train.train_step` built from the config) and, with --torch, the
PyTorch reference step of scripts/torch_reference.py at the same sizes (batch, frames, tokens, towers, text config,
heads, loss, Adam), side by side in one markdown table: init and compile time, step time (median of repeated steps
after warm-up), pairs/s, peak memory, our time over PyTorch's, XLA's FLOPs per step and the MFU. Inputs are random
(no dataset needed) and identical for both frameworks: log-mels for CNN14 (model.audio.arch "cnn14"), or for PaSST
(config.data.audio_feature "waveform") waveforms of data.train_max_frames x 320 samples (1000 frames: 10 s) in
[-1, 1], all valid; token ids, two captions per clip.

PaSST + RoBERTa (configs/clotho_passt_roberta.py): the PyTorch side is hear21passt's PaSST-S (structured patchout)
and transformers' RobertaModel without pooler; its front end is the torch port of data_pipelines/passt_features.py
(scripts/torch_passt_reference.py) run inside the timed step, as ours runs its JAX front end inside the jitted step.

bfloat16 (--config.model.dtype=bfloat16): ours computes in bfloat16 with float32 parameters, PyTorch under bfloat16
autocast. On a GPU, PyTorch's float32 matmuls use TF32 (`set_float32_matmul_precision("high")`), as XLA's default
precision does. MFU = FLOPs per step (XLA's `cost_analysis()` of our compiled step, per device; the same count for
the PyTorch rows) / (median step time x the card's peak dense FLOP/s of the dtype, `PEAK_FLOPS`: bf16, or TF32 for
float32); "-" on CPU or an unlisted card. --matmul_rate=N measures a ceiling on any device, CPU included: each
framework's own N x N matmul rate there, and the step's FLOP rate as a share of it.

Each framework runs in its own subprocess (`--worker`), so that peak memory is measured apart (CPU: the process's
peak RSS; GPU: the device's peak bytes in use) and XLA's and torch's thread pools do not compete; torch uses
`os.cpu_count()` threads. Ours runs with our entry points' process defaults (atr_jax.xla_flags: XLA flags and the
glibc malloc setting that stops page-faulting fresh memory every step), PyTorch with its own; --torch_keep_freed_memory
adds a PyTorch row with the same malloc setting. After set-up and warm-up, the workers take turns of
--steps_per_round timed steps, so that on a shared machine all see the same load; --sequential runs them one after
the other instead, one worker in memory at a time (PaSST-S + RoBERTa-large with Adam takes ~10 GB per CPU worker).

python -m scripts.benchmark_train --config configs/clotho_infonce.py --bert_base --torch \
    --config.train.global_batch_size=8 --config.data.train_max_frames=1001 --config.loss.name=ntxent
python -m scripts.benchmark_train --config configs/clotho_passt_roberta.py --roberta_large --torch \
    --torch_keep_freed_memory --config.train.global_batch_size=8 [--config.model.dtype=bfloat16]
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

from data_pipelines import audio_forms, features  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps of each framework, after the warm-up steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first (ours: after compilation).")
_STEPS_PER_ROUND = flags.DEFINE_integer("steps_per_round", 2, "The frameworks take turns, this many steps each.")
_TORCH = flags.DEFINE_bool("torch", False, "Also time the PyTorch reference step, in the same run.")
_TORCH_KEEP_FREED_MEMORY = flags.DEFINE_bool(
  "torch_keep_freed_memory",
  False,
  "One more PyTorch row (with --torch, or alone) that runs with our glibc malloc setting "
  "(atr_jax.xla_flags.keep_freed_memory), to show how much of the difference is the C allocator.",
)
_BERT_BASE = flags.DEFINE_bool(
  "bert_base",
  False,
  "Text tower: a randomly initialised BERT of bert-base-uncased shape (hidden 768, 12 layers, "
  "12 heads, intermediate 3072, vocab 30522) in place of model.text.model_dir.",
)
_ROBERTA_LARGE_FLAG = flags.DEFINE_bool(
  "roberta_large",
  False,
  "Text tower: a randomly initialised RoBERTa of roberta-large shape (hidden 1024, 24 layers, 16 heads, "
  "intermediate 4096, vocab 50265) in place of model.text.model_dir.",
)
_SEQUENTIAL = flags.DEFINE_bool(
  "sequential",
  False,
  "Run the frameworks one after the other, each worker alone in memory (for models whose workers do not fit in "
  "memory together), instead of taking turns: on a shared machine the rows may then see different loads.",
)
_MATMUL_RATE = flags.DEFINE_integer(
  "matmul_rate",
  0,
  "N > 0: also time an N x N matmul in each framework, on one device in the step's dtype (median of 5 after one "
  "untimed), and give the step's FLOP rate as a share of it: how close each step runs to what its framework's GEMM "
  "reaches on this device (XLA's FLOP count, as for MFU). 4096 suits a CPU, 16384 a GPU.",
)
_WORKER = flags.DEFINE_enum(
  "worker",
  None,
  ["jax", "torch", "torch_keep_freed_memory"],
  "Internal: serve one framework's step to the parent process over stdin/stdout.",
)

_REPLY_PREFIX = "BENCHMARK_WORKER "
_MATMUL_REPEATS = 5
_KEEP_FREED_MEMORY_NAME = "PyTorch + keep_freed_memory"
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
# atr_jax.models.bert.ROBERTA_LARGE (not imported: the torch worker holds no jax).
_ROBERTA_LARGE = {
  "architectures": ["RobertaForMaskedLM"],
  "model_type": "roberta",
  "vocab_size": 50265,
  "hidden_size": 1024,
  "num_hidden_layers": 24,
  "num_attention_heads": 16,
  "intermediate_size": 4096,
  "hidden_act": "gelu",
  "max_position_embeddings": 514,
  "type_vocab_size": 1,
  "layer_norm_eps": 1e-5,
  "hidden_dropout_prob": 0.1,
  "attention_probs_dropout_prob": 0.1,
  "initializer_range": 0.02,
  "pad_token_id": 1,
}
# Peak dense FLOP/s per device (bfloat16, float32 as TF32 tensor-core math), by a substring of the device name
# (jax's device_kind, torch.cuda.get_device_name()); the first match counts.
PEAK_FLOPS = (
  ("H200", {"bfloat16": 989e12, "float32": 494e12}),
  ("H100 PCIe", {"bfloat16": 756e12, "float32": 378e12}),
  ("H100 NVL", {"bfloat16": 835e12, "float32": 418e12}),
  ("H100", {"bfloat16": 989e12, "float32": 494e12}),  # SXM (device_kind "NVIDIA H100 80GB HBM3")
  ("A100", {"bfloat16": 312e12, "float32": 156e12}),
  ("L40S", {"bfloat16": 362e12, "float32": 183e12}),
  ("L4", {"bfloat16": 121e12, "float32": 60e12}),
)


def _text_json(config: ml_collections.ConfigDict) -> dict:
  path = os.path.join(os.path.expanduser(config.model.text.model_dir), "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"config.model.text.model_dir: no {path} (pass --bert_base or --roberta_large for a random-weight model)"
    )
  with open(path) as f:
    return json.load(f)


def _use_random_text_model(config: ml_collections.ConfigDict, folder: str, text_json: dict) -> None:
  """Points the config at a random-weight text model of `text_json`'s shape: its config.json (no weights, no
  tokenizer) written into `folder`."""
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(text_json, f, indent=2)
  config.model.text.model_dir = folder
  config.model.text.pretrained = False


def _waveform_input(config: ml_collections.ConfigDict) -> bool:
  return config.data.audio_feature == "waveform"


def _random_batch(config: ml_collections.ConfigDict) -> dict:
  """Numpy inputs of one global batch: random log-mels (or, for a waveform tower, waveforms in [-1, 1] of
  train_max_frames hops), all frames / samples valid, random token ids (no padding id), two captions per clip."""
  rng = np.random.default_rng(0)
  b, t, tokens = config.train.global_batch_size, config.data.train_max_frames, config.model.text.max_len
  if t < 1:
    raise ValueError(
      "config.data.train_max_frames must be set (e.g. 1001 for 10 s crops): the benchmark has no "
      "dataset to take the longest clip from"
    )
  if _waveform_input(config):
    samples = t * audio_forms.WAVEFORM.rows_per_frame
    audio = {
      "waveform": rng.uniform(-1.0, 1.0, (b, samples)).astype(np.float32),
      "sample_mask": np.ones((b, samples), bool),
    }
  else:
    audio = {
      "log_mel": (rng.standard_normal((b, t, 64)) * 10 - 40).astype(np.float32),
      "frame_mask": np.ones((b, t), bool),
    }
  text = _text_json(config)
  # RoBERTa derives position ids from the ids (HF) or the mask (ours): no id may be its padding id.
  low = text["pad_token_id"] + 2 if text.get("model_type") == "roberta" else 1
  return {
    **audio,
    "input_ids": rng.integers(low, text["vocab_size"], (b, tokens)).astype(np.int32),
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


def _matmul_rate(run_matmul: Callable[[], None], size: int) -> float:
  """FLOP/s of a square matmul of `size`: `run_matmul` returns once one is done (one untimed run first)."""
  run_matmul()
  return 2 * size**3 / float(np.median(_timed(run_matmul, _MATMUL_REPEATS)))


def _setup_jax(config: ml_collections.ConfigDict) -> _Bench:
  # Imported here, so that the torch worker holds no jax (nor the TensorFlow that atr_jax.train imports).
  import functools
  import jax
  from atr_jax import losses, sharding
  from atr_jax.models import weights
  from atr_jax.models.dual_encoder import build_model
  from atr_jax.train import train_step
  from atr_jax.train_state import create_train_state, make_optimizer

  config.model.audio.init_from = weights.SCRATCH  # Fresh weights: the step's cost does not depend on their values.
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
  cost = compiled.cost_analysis()  # a dict, or (older jax) a list of one dict per program
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
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
    "device_name": None if device.platform == "cpu" else device.device_kind,
    "dtype": config.model.dtype,
    "init_s": init_s,
    "compile_s": compile_s,
    "flops": cost.get("flops"),
  }
  if _MATMUL_RATE.value:
    size, dtype = _MATMUL_RATE.value, jax.numpy.dtype(config.model.dtype)
    a, b = (jax.device_put(jax.random.normal(jax.random.key(i), (size, size), dtype), device) for i in (2, 3))
    matmul = jax.jit(jax.numpy.matmul)
    info["matmul_flops_per_s"] = _matmul_rate(lambda: matmul(a, b).block_until_ready(), size)
  return _Bench(info, run_step, finish)


def _setup_torch(config: ml_collections.ConfigDict, name: str = "PyTorch") -> _Bench:
  import torch
  from scripts import torch_reference

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(config.seed)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.set_float32_matmul_precision("high")  # GPU: TF32 matmuls, as XLA's default precision; CPU: no effect
  start = time.perf_counter()
  step = torch_reference.build_from_config(config)
  step.model.to(device)
  init_s = time.perf_counter() - start
  batch = {k: torch.from_numpy(v).to(device) for k, v in _random_batch(config).items()}
  audio = batch["waveform"] if _waveform_input(config) else batch["log_mel"]
  losses = []

  def run_step():  # The step returns python floats: it is done.
    losses.append(step(audio, batch["input_ids"], batch["attention_mask"], batch["clip_id"])[0])

  on_cpu = device.type == "cpu"

  def finish():
    peak = _peak_rss_bytes() if on_cpu else torch.cuda.max_memory_allocated()
    return {"peak_bytes": peak, "peak_kind": "RSS" if on_cpu else "device", "loss": losses[-1]}

  threads = f"{torch.get_num_threads()} threads" if on_cpu else torch.cuda.get_device_name()
  dtype = "bfloat16 autocast" if config.model.dtype == "bfloat16" else "float32"
  info = {
    "name": name,
    "device": f"{device.type} ({threads})",
    "device_name": None if on_cpu else torch.cuda.get_device_name(),
    "dtype": dtype,
    "init_s": init_s,
    "compile_s": None,
  }
  if _MATMUL_RATE.value:
    dtype = torch.bfloat16 if config.model.dtype == "bfloat16" else torch.float32
    size = _MATMUL_RATE.value
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def run_matmul():
      with torch.no_grad():
        torch.matmul(a, b)
      synchronize()

    info["matmul_flops_per_s"] = _matmul_rate(run_matmul, size)
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


def measure(
  frameworks: list[str], warmup: int, repeats: int, steps_per_round: int, sequential: bool = False
) -> list[dict]:
  """Starts one worker per framework (one after the other), then times rounds of `steps_per_round` steps of each
  in turn, so that every framework sees the same machine load; -> per framework: info, times, peak, loss. With
  `sequential`, each worker runs all its steps and exits before the next starts (one in memory at a time)."""
  if sequential:
    results = []
    for framework in frameworks:
      worker = _Worker(framework)
      times = worker.ask(f"steps {repeats}")["times"]
      results.append({**worker.info, "times": times, **worker.ask("finish")})
      worker.process.wait()
    return results
  workers = [_Worker(framework) for framework in frameworks]
  times = {worker.framework: [] for worker in workers}
  for start in range(0, repeats, steps_per_round):
    for worker in workers:
      times[worker.framework] += worker.ask(f"steps {min(steps_per_round, repeats - start)}")["times"]
  results = [{**worker.info, "times": times[worker.framework], **worker.ask("finish")} for worker in workers]
  for worker in workers:
    worker.process.wait()
  return results


def peak_flops(device_name: str | None, dtype: str) -> float | None:
  """The card's peak dense FLOP/s for `dtype` ("bfloat16..." or "float32") from PEAK_FLOPS; None on CPU (no name)
  or for an unlisted card."""
  if not device_name:
    return None
  for part, peaks in PEAK_FLOPS:
    if part in device_name:
      return peaks["bfloat16" if dtype.startswith("bfloat16") else "float32"]
  return None


def _caption(config: ml_collections.ConfigDict) -> str:
  """One line naming what is compared beyond the table's columns: the towers and the audio input."""
  audio = config.model.audio
  if _waveform_input(config):
    seconds = config.data.train_max_frames * audio_forms.WAVEFORM.rows_per_frame / features.SAMPLE_RATE
    audio_text = (
      f"PaSST ({audio.passt.depth}x{audio.passt.embed_dim}, patchout {audio.passt.patchout_time}/"
      f"{audio.passt.patchout_freq}) on {seconds:g} s waveforms, front end inside the step (ours: JAX; PyTorch: "
      "torch port of passt_features)"
    )
  else:
    audio_text = f"{audio.arch} on log-mels"
  heads = "Linear heads" if config.model.head_hidden == 0 else f"MLP heads ({config.model.head_hidden})"
  return (
    f"Audio: {audio_text}; text: {config.model.text.arch}; {heads}; loss {config.loss.name}; "
    f"{config.optim.name}; random inputs and weights."
  )


def format_table(config: ml_collections.ConfigDict, results: list[dict]) -> str:
  """A caption line, then one markdown row per framework: step time over the PyTorch one and over the PyTorch +
  keep_freed_memory one (when present), XLA's GFLOP per step (ours), each row's MFU against its card's peak, with
  --matmul_rate its framework's square-matmul rate and the step's share of it, and the loss of its last step
  (random weights: each framework its own, so the losses agree only roughly)."""
  text = _text_json(config)
  text_shape = f"{text['num_hidden_layers']}x{text['hidden_size']}"
  medians = {r["name"]: float(np.median(r["times"])) for r in results}
  flops = next((r.get("flops") for r in results if r.get("flops")), None)
  rows = [
    _caption(config),
    "",
    "| framework | device | dtype | batch | frames | tokens | text layers x width | init s | compile s | "
    "step s median (min-max) | pairs/s | peak memory GB | time / PyTorch | time / PyTorch + keep_freed_memory | "
    "GFLOP / step | MFU | matmul GFLOP/s | step / matmul rate | last loss |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  batch = config.train.global_batch_size
  for r in results:
    median = medians[r["name"]]
    compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
    ratios = [
      "-" if reference not in medians else f"{median / medians[reference]:.2f}"
      for reference in ("PyTorch", _KEEP_FREED_MEMORY_NAME)
    ]
    peak = peak_flops(r.get("device_name"), r["dtype"])
    mfu = "-" if peak is None or not flops else f"{flops / (median * peak):.1%}"
    matmul = r.get("matmul_flops_per_s")
    matmul_cells = (
      "- | -" if not matmul else f"{matmul / 1e9:.4g} | " + ("-" if not flops else f"{flops / (median * matmul):.1%}")
    )
    rows.append(
      f"| {r['name']} | {r['device']} | {r['dtype']} | {batch} | {config.data.train_max_frames} | "
      f"{config.model.text.max_len} | {text_shape} | {r['init_s']:.1f} | {compile_s} | "
      f"{median:.3f} ({min(r['times']):.3f}-{max(r['times']):.3f}) | {batch / median:.1f} | "
      f"{r['peak_bytes'] / 1e9:.2f} ({r['peak_kind']}) | {ratios[0]} | {ratios[1]} | "
      f"{'-' if not flops else f'{flops / 1e9:.4g}'} | {mfu} | {matmul_cells} | {r['loss']:.4f} |"
    )
  return "\n".join(rows)


def main(argv):
  del argv
  config = _CONFIG.value
  with tempfile.TemporaryDirectory() as folder:
    if _MATMUL_RATE.value < 0:
      raise app.UsageError(f"--matmul_rate={_MATMUL_RATE.value}: give a matmul size N > 0, or 0 for none")
    if _BERT_BASE.value and _ROBERTA_LARGE_FLAG.value:
      raise app.UsageError("--bert_base and --roberta_large: choose one")
    if _BERT_BASE.value:
      _use_random_text_model(config, folder, _BERT_BASE_UNCASED)
    if _ROBERTA_LARGE_FLAG.value:
      _use_random_text_model(config, folder, _ROBERTA_LARGE)
    if _WORKER.value is not None:
      setups = {
        "jax": _setup_jax,
        "torch": _setup_torch,
        "torch_keep_freed_memory": lambda c: _setup_torch(c, _KEEP_FREED_MEMORY_NAME),
      }
      _serve(setups[_WORKER.value](config), _WARMUP.value)
      return
    frameworks = ["jax"] + (["torch"] if _TORCH.value else [])
    frameworks += ["torch_keep_freed_memory"] if _TORCH_KEEP_FREED_MEMORY.value else []
    results = measure(frameworks, _WARMUP.value, _REPEATS.value, _STEPS_PER_ROUND.value, _SEQUENTIAL.value)
    print(format_table(config, results), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
