"""Per-device memory of the RoBERTa-large train step (the DCASE 2025 baseline's text side, SPEC 11) as XLA plans it.

The step (forward, backward, Adam update; train state donated as in atr_jax.train) of the `model.text.arch="roberta"`
tower, random-initialised at `roberta-large`'s config, whose first-token state goes through the baseline's
Linear(1024, 1024) head (with --audio ARCH, a registered audio tower and its Linear head too, and the symmetric
InfoNCE loss; without, the captions are scored against a batch of fixed unit vectors) is compiled ahead of time for
every combination of parameter sharding (replicated / fsdp), compute dtype (float32 / bfloat16) and remat (off / on)
on a 1-D mesh of --devices devices (fake CPU devices unless set otherwise), from `jax.eval_shape` arguments: nothing
is allocated or run. Prints a markdown table of `compiled.memory_analysis()` per device (arguments, outputs, their
aliased part, temporaries, and the peak = arguments + outputs - aliased + temporaries, in GiB) and the parameter count.

The audio tower takes what it takes in training: log-mels (--frames x --mels) for "cnn14" and "resnet38", 32 kHz
waveforms of --frames x 320 samples for "passt" (its front end runs inside the step; PaSST-S + RoBERTa-large is the
DCASE 2025 baseline: --audio=passt --frames=1000, 10 s clips).

python -m scripts.memory_report --batch_size=64 --max_len=32 [--audio=cnn14 --frames=1001 | --audio=passt --frames=1000]
"""

import os
import sys

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  _devices = next((arg.split("=", 1)[1] for arg in sys.argv if arg.startswith("--devices=")), "8")
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={_devices}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from atr_jax import sharding  # noqa: E402
from atr_jax.models import registry  # noqa: E402
from atr_jax.models.bert import ROBERTA_LARGE  # noqa: E402
from configs.base import get_base_config  # noqa: E402
from data_pipelines import audio_forms, features  # noqa: E402

_BATCH = flags.DEFINE_integer("batch_size", 64, "Global batch (caption, clip) pairs per step.")
_MAX_LEN = flags.DEFINE_integer("max_len", 32, "Tokens per caption.")
_AUDIO = flags.DEFINE_string("audio", "", "A registered audio tower (model.audio.arch) to add; '' = text side only.")
_FRAMES = flags.DEFINE_integer(
  "frames", 1001, "Frames per clip (with --audio): log-mel frames, or for a waveform tower (passt) 320-sample hops."
)
_MELS = flags.DEFINE_integer("mels", 64, "Mel bins per frame (with --audio).")
_DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices (read before jax starts).")
_EMBED_DIM = 1024
_TAU = 0.05
_GIB = 2.0**30


class _Model(nn.Module):
  """Text tower -> first token -> Linear head (and audio tower -> Linear head), L2-normalised float32 embeddings."""

  text: nn.Module
  audio: nn.Module | None = None

  @nn.compact
  def __call__(self, batch: dict, train: bool):
    def head(x, name):
      x = nn.Dense(_EMBED_DIM, dtype=self.text.dtype, name=name)(x).astype(jnp.float32)
      return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)

    _, first = self.text(batch["input_ids"], batch["attention_mask"], train)
    text = head(first, "text_head")
    if self.audio is None:
      return batch["targets"], text
    return head(self.audio(*registry.audio_inputs(batch), train), "audio_head"), text


def _loss(audio: jax.Array, text: jax.Array) -> jax.Array:
  logits = audio @ text.T / _TAU
  labels = jnp.arange(logits.shape[0])
  return 0.5 * (
    optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  )


def _model(text_dir: str, dtype, remat: bool) -> _Model:
  config = get_base_config().model
  config.text.arch, config.text.model_dir, config.text.pretrained = "roberta", text_dir, False
  text = registry.text_tower(config.text).build(config.text, dtype, remat)
  if not _AUDIO.value:
    return _Model(text)
  config.audio.arch = _AUDIO.value
  return _Model(text, registry.audio_tower(config.audio).build(config.audio, dtype, remat))


def _waveform_audio() -> bool:
  """Whether the --audio tower takes waveforms (PaSST) rather than log-mels."""
  config = get_base_config().model.audio
  config.arch = _AUDIO.value
  return registry.audio_tower(config).inputs == registry.WAVEFORM_INPUTS


def _abstract_batch(mesh) -> tuple[dict, dict]:
  batch, length = _BATCH.value, _MAX_LEN.value
  shapes = {"input_ids": ((batch, length), jnp.int32), "attention_mask": ((batch, length), jnp.int32)}
  if _AUDIO.value and _waveform_audio():
    samples = _FRAMES.value * audio_forms.WAVEFORM.rows_per_frame
    shapes |= {"waveform": ((batch, samples), jnp.float32), "sample_mask": ((batch, samples), bool)}
  elif _AUDIO.value:
    shapes |= {
      "log_mel": ((batch, _FRAMES.value, _MELS.value), jnp.float32),
      "frame_mask": ((batch, _FRAMES.value), bool),
    }
  else:
    shapes["targets"] = ((batch, _EMBED_DIM), jnp.float32)
  on_data = sharding.batch_sharding(mesh)
  abstract = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=on_data) for name, (shape, dtype) in shapes.items()}
  return abstract, {name: on_data for name in shapes}


def _compile(model: _Model, mesh, mode: str):
  """(compiled train step, parameter count) for `model` with its state sharded by `mode`."""
  tx = optax.adam(2e-5)
  batch, batch_shardings = _abstract_batch(mesh)
  key = jax.random.key(0)

  def init(rng):
    host_batch = {name: jnp.zeros(x.shape, x.dtype) for name, x in batch.items()}
    params = model.init(rng, jax.tree.map(lambda x: x[:1], host_batch), train=False)["params"]
    return {"params": params, "opt_state": tx.init(params)}

  abstract_state = jax.eval_shape(init, key)
  state_shardings = sharding.state_shardings(abstract_state, mesh, mode)
  abstract_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, state_shardings
  )

  def step(state, batch, rng):
    def loss_fn(params):
      return _loss(*model.apply({"params": params}, batch, train=True, rngs={"dropout": rng, "augment": rng}))

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss

  jitted = jax.jit(
    step,
    in_shardings=(state_shardings, batch_shardings, sharding.replicated(mesh)),
    out_shardings=(state_shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )
  compiled = jitted.lower(abstract_state, batch, key).compile()
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state["params"]))
  return compiled, count


def _audio_input_text() -> str:
  if _waveform_audio():
    samples = _FRAMES.value * audio_forms.WAVEFORM.rows_per_frame
    return f", waveforms of {samples} samples ({samples / features.SAMPLE_RATE:g} s; front end in the step)"
  return f", {_FRAMES.value} frames x {_MELS.value} mels"


def main(argv):
  del argv
  mesh = sharding.create_mesh()
  with tempfile.TemporaryDirectory() as text_dir:
    with open(os.path.join(text_dir, "config.json"), "w") as f:
      json.dump(dataclasses.asdict(ROBERTA_LARGE), f)
    rows, count = [], None
    for mode, dtype_name, remat in itertools.product(sharding.PARAM_SHARDINGS, ("float32", "bfloat16"), (False, True)):
      model = _model(text_dir, {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name], remat)
      start = time.perf_counter()
      compiled, count = _compile(model, mesh, mode)
      seconds = time.perf_counter() - start
      stats = compiled.memory_analysis()
      sizes = [
        stats.argument_size_in_bytes,
        stats.output_size_in_bytes,
        stats.alias_size_in_bytes,
        stats.temp_size_in_bytes,
      ]
      peak = sizes[0] + sizes[1] - sizes[2] + sizes[3]
      rows.append([mode, dtype_name, "on" if remat else "off", *[f"{b / _GIB:.2f}" for b in (*sizes, peak)]])
      rows[-1].append(f"{seconds:.0f}")
      print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
  towers = "RoBERTa-large + Linear head" + (f", {_AUDIO.value} + Linear head" if _AUDIO.value else "")
  print(
    f"\n{towers}: {count:,} parameters; global batch {_BATCH.value}, {_MAX_LEN.value} tokens"
    + (_audio_input_text() if _AUDIO.value else "")
    + f"; {jax.device_count()} {jax.devices()[0].platform} devices; Adam; GiB per device\n"
  )
  header = ["params", "compute", "remat", "arguments", "outputs", "aliased", "temporaries", "peak", "compile s"]
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for row in rows:
    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
  app.run(main)
