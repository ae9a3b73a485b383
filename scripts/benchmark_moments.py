"""Moment-model training-step benchmark: ours (`atr_jax.moments.train.make_train_step`, jitted, on the mesh of all
devices) against the PyTorch QD-DETR of scripts/torch_qd_detr.py (the same layers, sizes and loss terms, written from
the published description), float32, the model and loss of `config.moments` (configs/base.py: d 256, 8 heads, FFN
1024, 2 + 2 encoder and 2 decoder layers, 10 queries; AdamW, global-norm clipping 0.1).

A step is the forward in training mode (dropout on) with the mismatched-query pass, the Hungarian matching of every
decoder layer on the host (ours through `jax.pure_callback` inside the jitted step, PyTorch's in Python; both scipy
`linear_sum_assignment`), the loss, the backward pass and the AdamW update. Each step gets a fresh random batch,
the same for both frameworks (made and placed before the clock starts): --batch recordings of up to --frames frames
of --feature_dim + 2 features (L2-normalised, then the frame's start and end fractions; between half and all frames
valid), up to --tokens tokens of --feature_dim features (a quarter to all valid), 1 to --max_windows windows each.

Each framework runs in its own subprocess (`--worker`), one after the other, so that their thread pools do not
compete; torch uses `os.cpu_count()` threads, ours runs with our entry points' process defaults
(`atr_jax.xla_flags`). Printed: a markdown table of parameter count, init time, compile time (ours: lowering and
compiling the step, apart from the step times), the median and range of --repeats step times after --warmup steps,
peak RSS, and our median over PyTorch's.

python -m scripts.benchmark_moments [--batch=32] [--frames=300] [--tokens=32] [--feature_dim=512] [--repeats=10]
"""

import sys

from atr_jax import xla_flags

if "--worker=jax" in sys.argv:
  xla_flags.set_defaults()  # Before jax is imported.

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from configs.base import get_base_config  # noqa: E402

FRAMEWORKS = ("jax", "torch")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=32, help="Queries per step.")
  parser.add_argument("--frames", type=int, default=300, help="Frames per recording (padded length).")
  parser.add_argument("--tokens", type=int, default=32, help="Text tokens per query (padded length).")
  parser.add_argument("--feature_dim", type=int, default=512, help="D: frames have D + 2 features, tokens D.")
  parser.add_argument("--max_windows", type=int, default=5, help="Ground-truth windows per query: 1 to this.")
  parser.add_argument("--repeats", type=int, default=10, help="Timed steps per framework.")
  parser.add_argument("--warmup", type=int, default=2, help="Untimed steps before them.")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--worker", choices=FRAMEWORKS, help="Internal: run one framework, write JSON to --result.")
  parser.add_argument("--result", help="Internal: the worker's JSON output file.")
  return parser.parse_args(argv)


def make_batch(args, index: int) -> dict:
  """The index-th random batch (numpy; the same in both workers)."""
  rng = np.random.default_rng([args.seed, index])
  b, t, length, d = args.batch, args.frames, args.tokens, args.feature_dim
  num_frames = rng.integers(max(t // 2, 1), t + 1, b)
  num_tokens = rng.integers(max(length // 4, 1), length + 1, b)
  audio_mask = np.arange(t) < num_frames[:, None]
  text_mask = np.arange(length) < num_tokens[:, None]
  features = rng.standard_normal((b, t, d), dtype=np.float32)
  features /= np.linalg.norm(features, axis=-1, keepdims=True)
  starts = np.arange(t) / num_frames[:, None]
  audio = np.concatenate([features, starts[..., None], (starts + 1 / num_frames[:, None])[..., None]], -1)
  audio = np.where(audio_mask[..., None], audio, 0).astype(np.float32)
  text = np.where(text_mask[..., None], rng.standard_normal((b, length, d), dtype=np.float32), 0)
  window_mask = np.arange(args.max_windows) < rng.integers(1, args.max_windows + 1, b)[:, None]
  start = rng.uniform(0, 0.9, (b, args.max_windows))
  end = np.minimum(start + rng.uniform(0.01, 0.3, start.shape), 1.0)
  windows = np.where(window_mask[..., None], np.stack([start, end], -1), 0).astype(np.float32)
  return dict(
    audio=audio, audio_mask=audio_mask, text=text, text_mask=text_mask, windows=windows, window_mask=window_mask
  )


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_jax(args, config) -> dict:
  import jax

  from atr_jax import sharding
  from atr_jax.moments import train

  mesh = sharding.create_mesh()
  rng = jax.random.key(args.seed)
  start = time.perf_counter()
  state, _ = train.create_state(config, (args.feature_dim + 2, args.feature_dim), mesh, rng)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - start
  batches = (sharding.global_batch(make_batch(args, i), mesh) for i in range(args.warmup + args.repeats))
  batch = next(batches)
  start = time.perf_counter()
  step = train.make_train_step(config).lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - start
  times = []
  for i in range(args.warmup + args.repeats):
    jax.block_until_ready(batch)
    start = time.perf_counter()
    state, scalars = step(state, batch, jax.random.fold_in(rng, i))
    jax.block_until_ready((state, scalars))
    times.append(time.perf_counter() - start)
    batch = next(batches, None)
  return dict(
    name=f"ours (JAX {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} device(s))",
    parameters=sum(int(np.size(p)) for p in jax.tree.leaves(state.params)),
    init_s=init_s,
    compile_s=compile_s,
    step_s=times[args.warmup :],
    loss=float(scalars["loss"]),
  )


def _run_torch(args, config) -> dict:
  import torch

  from scripts import torch_qd_detr

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(args.seed)
  start = time.perf_counter()
  model = torch_qd_detr.QDDETR(config.model, args.feature_dim + 2, args.feature_dim)
  optimizer = torch_qd_detr.make_optimizer(model, config.train)
  step = torch_qd_detr.make_train_step(model, optimizer, config, torch.Generator().manual_seed(args.seed))
  init_s = time.perf_counter() - start
  times = []
  for i in range(args.warmup + args.repeats):
    batch = {k: torch.from_numpy(v) for k, v in make_batch(args, i).items()}
    start = time.perf_counter()
    loss, _ = step(batch)
    times.append(time.perf_counter() - start)
  return dict(
    name=f"PyTorch {torch.__version__} ({torch.get_num_threads()} threads)",
    parameters=sum(p.numel() for p in model.parameters()),
    init_s=init_s,
    compile_s=None,
    step_s=times[args.warmup :],
    loss=float(loss),
  )


def _worker(args) -> None:
  config = get_base_config().moments
  config.train.global_batch_size = args.batch
  result = (_run_jax if args.worker == "jax" else _run_torch)(args, config)
  result["peak_rss_mb"] = _peak_rss_mb()
  with open(args.result, "w") as f:
    json.dump(result, f)


def format_table(results: list[dict]) -> str:
  ours = float(np.median(results[0]["step_s"]))
  lines = [
    "| framework (fp32) | parameters | init s | compile s | step ms median (min-max) | peak RSS MB | ours / that |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in results:
    ms = 1000 * np.asarray(r["step_s"])
    compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
    ratio = "-" if r is results[0] else f"{ours / np.median(r['step_s']):.2f}"
    lines.append(
      f"| {r['name']} | {r['parameters']:,} | {r['init_s']:.1f} | {compile_s} | {np.median(ms):.1f} "
      f"({ms.min():.1f}-{ms.max():.1f}) | {r['peak_rss_mb']:,.0f} | {ratio} |"
    )
  return "\n".join(lines)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.worker:
    _worker(args)
    return
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for framework in FRAMEWORKS:
      path = os.path.join(tmp, f"{framework}.json")
      flags = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("worker", "result")]
      command = [sys.executable, "-m", "scripts.benchmark_moments", *flags, f"--worker={framework}", f"--result={path}"]
      subprocess.run(command, check=True)
      with open(path) as f:
        results.append(json.load(f))
  print(
    f"Batch {args.batch}, {args.frames} frames of {args.feature_dim}+2, {args.tokens} tokens of {args.feature_dim}, "
    f"1-{args.max_windows} windows; median of {args.repeats} steps after {args.warmup} warm-up; "
    f"last step's loss {results[0]['loss']:.3f} (ours) / {results[1]['loss']:.3f} (PyTorch; its own initialisation)"
  )
  print(format_table(results))


if __name__ == "__main__":
  main()
