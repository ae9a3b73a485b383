"""The train state (params = {'model', 'loss'}, Adam state, BatchNorm statistics, reduce-on-plateau bookkeeping)
and how it is born: sharded over the mesh (replicated or FSDP, `sharding.state_shardings`) through `jax.eval_shape`
+ jit `out_shardings`, with pretrained text weights and converted PANNs audio weights (`model.audio.init_from`)
loaded; the optimizer (Adam/AdamW, learning-rate schedules) with frozen subtrees and per-tower learning rates."""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from atr_jax import losses, sharding
from atr_jax.models.dual_encoder import load_pretrained, with_frozen_towers_in_inference
from atr_jax.models.registry import audio_tower, example_audio

FREEZABLE = ("audio", "text", "audio_head", "text_head")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("step", "cosine", "plateau", "constant")
_PLATEAU_THRESHOLD = 1e-4  # Relative improvement that resets the patience (PyTorch's ReduceLROnPlateau default).


class TrainState(train_state.TrainState):
  """Flax's TrainState plus BatchNorm statistics and the reduce-on-plateau state: every update is multiplied by
  `lr_scale` (1 unless optim.schedule is "plateau"), which `reduce_on_plateau` lowers between epochs."""

  batch_stats: Any
  lr_scale: jax.Array
  best_val_loss: jax.Array
  epochs_without_improvement: jax.Array

  def apply_gradients(self, *, grads, **kwargs):
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    updates = jax.tree.map(lambda u: u * self.lr_scale.astype(u.dtype), updates)
    return self.replace(
      step=self.step + 1, params=optax.apply_updates(self.params, updates), opt_state=opt_state, **kwargs
    )


def reduce_on_plateau(state: TrainState, val_loss: float, optim_config: ml_collections.ConfigDict) -> TrainState:
  """The state after an epoch whose validation loss is `val_loss` (host-side; identical on every process): the
  patience counter resets on a relative improvement of 1e-4, and after `plateau_patience` epochs without one the
  learning-rate scale is multiplied by `plateau_factor` (PyTorch's ReduceLROnPlateau, mode min)."""
  best, waited, scale = (float(state.best_val_loss), int(state.epochs_without_improvement), float(state.lr_scale))
  if val_loss < best * (1 - _PLATEAU_THRESHOLD):
    best, waited = val_loss, 0
  else:
    waited += 1
  if waited > optim_config.plateau_patience:
    scale, waited = scale * optim_config.plateau_factor, 0
  values = {
    "best_val_loss": np.float32(best),
    "epochs_without_improvement": np.int32(waited),
    "lr_scale": np.float32(scale),
  }
  return state.replace(**{k: jax.device_put(v, getattr(state, k).sharding) for k, v in values.items()})


def make_schedule(
  optim_config: ml_collections.ConfigDict, learning_rate: float, steps_per_epoch: int, num_epochs: int
) -> optax.Schedule:
  """The learning rate per step for `optim.schedule` (reduce-on-plateau is a constant here, scaled in the state)."""
  name = optim_config.schedule
  if name == "step":
    return optax.exponential_decay(
      init_value=learning_rate,
      transition_steps=optim_config.decay_every_epochs * steps_per_epoch,
      decay_rate=optim_config.decay_factor,
      staircase=True,
    )
  if name == "cosine":
    total = steps_per_epoch * num_epochs
    warmup = min(int(round(optim_config.warmup_epochs * steps_per_epoch)), total - 1)
    if optim_config.decay_epochs < 0:
      raise ValueError(f"optim.decay_epochs={optim_config.decay_epochs} is negative")
    decay = int(round(optim_config.decay_epochs * steps_per_epoch)) or total - warmup
    return optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps=warmup, decay_steps=warmup + decay, end_value=optim_config.end_learning_rate
    )
  if name in ("plateau", "constant"):
    return optax.constant_schedule(learning_rate)
  raise ValueError(f"optim.schedule={name!r} is not one of {SCHEDULES}")


def make_optimizer(optim_config: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int = 1):
  """Adam or AdamW (`optim.name`) with the `optim.schedule` learning rate, after global-norm clipping. Each
  top-level model subtree gets a label: 'frozen' (listed in `optim.frozen`: gradients zeroed before clipping, no
  update, no Adam state), 'text' (the BERT body, when `optim.text_learning_rate` is set: its own optimizer) or
  'rest'. AdamW decays only matrices and kernels (ndim >= 2), not biases or norms. Returns (tx, main schedule)."""
  frozen = tuple(optim_config.frozen)
  unknown = sorted(set(frozen) - set(FREEZABLE))
  if unknown:
    raise ValueError(f"optim.frozen holds {unknown}; freezable subtrees are {FREEZABLE}")
  name = optim_config.name
  if name not in OPTIMIZERS:
    raise ValueError(f"optim.name={name!r} is not one of {OPTIMIZERS}")

  def optimizer(learning_rate):
    schedule = make_schedule(optim_config, learning_rate, steps_per_epoch, num_epochs)
    if name == "adamw":
      return optax.adamw(
        schedule,
        weight_decay=optim_config.weight_decay,
        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
      )
    return optax.adam(schedule)

  def label(name):
    if name in frozen:
      return "frozen"
    return "text" if name == "text" and optim_config.text_learning_rate is not None else "rest"

  def labels(params):
    return {
      "model": {name: jax.tree.map(lambda _: label(name), subtree) for name, subtree in params["model"].items()},
      "loss": jax.tree.map(lambda _: "rest", params["loss"]),
    }

  schedule = make_schedule(optim_config, optim_config.learning_rate, steps_per_epoch, num_epochs)
  updates = {"rest": optimizer(optim_config.learning_rate), "frozen": optax.set_to_zero()}
  if optim_config.text_learning_rate is not None:
    updates["text"] = optimizer(optim_config.text_learning_rate)
  parts = []
  if frozen:  # Frozen gradients must not count in the clipping norm.
    parts.append(
      optax.multi_transform(
        {name: optax.set_to_zero() if name == "frozen" else optax.identity() for name in updates}, labels
      )
    )
  if optim_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  return optax.chain(*parts, optax.multi_transform(updates, labels)), schedule


def create_train_state(config: ml_collections.ConfigDict, model, tx, mesh, rng):
  """A train state (params = {'model', 'loss'}) sharded as `train.param_sharding` says, and its shardings;
  pretrained text weights loaded, and the audio tower from `model.audio.init_from` unless "scratch". The state's
  apply_fn runs frozen towers (optim.frozen) in inference mode when `model.frozen_in_inference_mode` is True."""
  model = with_frozen_towers_in_inference(model, tuple(config.optim.frozen), config.model.frozen_in_inference_mode)
  dummy = (
    *example_audio(audio_tower(config.model.audio)),  # Any length: no parameter depends on it.
    np.zeros((1, config.model.text.max_len), np.int32),
    np.ones((1, config.model.text.max_len), np.int32),
  )

  def init(rng):
    variables = model.init({"params": rng, "dropout": rng, "augment": rng}, *dummy, train=False)
    loss_params = losses.init_loss_params_from_config(config.loss)
    return TrainState.create(
      apply_fn=model.apply,
      params={"model": variables["params"], "loss": loss_params},
      tx=tx,
      batch_stats=variables.get("batch_stats", {}),  # Towers without BatchNorm have none.
      lr_scale=jnp.float32(1.0),
      best_val_loss=jnp.float32(np.inf),
      epochs_without_improvement=jnp.int32(0),
    )

  shardings = sharding.state_shardings(jax.eval_shape(init, rng), mesh, config.train.param_sharding)
  state = jax.jit(init, out_shardings=shardings)(rng)
  # Adam's moments are zeros of the same shapes: only params and batch_stats change.
  variables = load_pretrained({"params": state.params["model"], "batch_stats": state.batch_stats}, config.model)
  state = state.replace(params={**state.params, "model": variables["params"]}, batch_stats=variables["batch_stats"])
  return state, shardings
