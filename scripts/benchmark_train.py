"""Training-step benchmark: compile time, then the median of repeated jitted steps after warm-up, on random
log-mels and token ids shaped by a config (no dataset needed).

python -m scripts.benchmark_train --config configs/demo.py [--config.train.global_batch_size=16] [--repeats 10]
"""
from atr_jax import xla_flags

xla_flags.set_defaults()  # Before jax is imported.

import functools  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from atr_jax import losses, sharding  # noqa: E402
from atr_jax.models.dual_encoder import build_model  # noqa: E402
from atr_jax.train import train_step  # noqa: E402
from atr_jax.train_state import create_train_state, make_optimizer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps after 2 warm-up steps.")


def _random_batch(config, rng: np.random.Generator) -> dict:
  b, t, l = config.train.global_batch_size, config.data.train_max_frames, config.model.text.max_len
  return {"log_mel": (rng.standard_normal((b, t, 64)) * 10 - 40).astype(np.float32),
          "frame_mask": np.ones((b, t), bool),
          "input_ids": rng.integers(1000, 2000, (b, l)).astype(np.int32),
          "attention_mask": np.ones((b, l), np.int32),
          "clip_id": np.arange(b, dtype=np.int32) // 2}


def main(argv):
  del argv
  config = _CONFIG.value
  mesh = sharding.create_mesh()
  model = build_model(config.model)
  tx, _ = make_optimizer(config.optim, steps_per_epoch=1000)
  state, shardings = create_train_state(config, model, tx, mesh, jax.random.key(0, impl="rbg"))
  loss_fn = losses.make_loss_fn_from_config(config.loss, mesh)
  step = jax.jit(functools.partial(train_step, loss_fn=loss_fn, rng=jax.random.key(1)),
                 in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  batch = sharding.global_batch(_random_batch(config, np.random.default_rng(0)), mesh)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  times = []
  for i in range(2 + _REPEATS.value):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    if i >= 2:
      times.append(time.perf_counter() - start)
  b = config.train.global_batch_size
  median = float(np.median(times))
  print(f"| devices | batch | frames | tokens | compile s | step median s | pairs/s |\n"
        f"|---|---|---|---|---|---|---|\n"
        f"| {jax.device_count()} {jax.devices()[0].platform} | {b} | {config.data.train_max_frames} | "
        f"{config.model.text.max_len} | {compile_s:.1f} | {median:.3f} | {b / median:.1f} |")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
