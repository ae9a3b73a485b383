"""The train state (params = {'model', 'loss'}, Adam state, BatchNorm statistics) and how it is born: replicated
over the mesh through `jax.eval_shape` + jit `out_shardings`, with pretrained text weights loaded."""
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from atr_jax import losses, sharding
from atr_jax.models.dual_encoder import load_pretrained_text


class TrainState(train_state.TrainState):
  batch_stats: Any


def make_optimizer(optim_config: ml_collections.ConfigDict, steps_per_epoch: int):
  """Adam with the reference's step decay, after global-norm clipping; the pretrained text tower (BERT body) may
  get its own learning rate (`optim.text_learning_rate`). Returns (tx, schedule of the main learning rate)."""
  def step_decay(learning_rate):
    return optax.exponential_decay(
        init_value=learning_rate, transition_steps=optim_config.decay_every_epochs * steps_per_epoch,
        decay_rate=optim_config.decay_factor, staircase=True)

  schedule = step_decay(optim_config.learning_rate)
  adam = optax.adam(schedule)
  if optim_config.text_learning_rate is not None:
    def labels(params):
      return {"model": {name: "text" if name == "text" else "rest" for name in params["model"]},
              "loss": jax.tree.map(lambda _: "rest", params["loss"])}
    adam = optax.multi_transform(
        {"rest": adam, "text": optax.adam(step_decay(optim_config.text_learning_rate))}, labels)
  parts = [optax.clip_by_global_norm(optim_config.grad_clip_norm)] if optim_config.grad_clip_norm > 0 else []
  return optax.chain(*parts, adam), schedule


def create_train_state(config: ml_collections.ConfigDict, model, tx, mesh, rng):
  """A replicated train state (params = {'model', 'loss'}) and its shardings; pretrained text weights loaded."""
  frames = config.data.train_max_frames
  dummy = (np.zeros((1, frames, 64), np.float32), np.ones((1, frames), bool),
           np.zeros((1, config.model.text.max_len), np.int32), np.ones((1, config.model.text.max_len), np.int32))

  def init(rng):
    variables = model.init({"params": rng, "dropout": rng, "augment": rng}, *dummy, train=False)
    loss_params = losses.init_loss_params(config.loss.name, learnable_temperature=config.loss.learnable_temperature,
                                          temperature=config.loss.temperature)
    return TrainState.create(apply_fn=model.apply, params={"model": variables["params"], "loss": loss_params},
                             tx=tx, batch_stats=variables["batch_stats"])

  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), jax.eval_shape(init, rng))
  state = jax.jit(init, out_shardings=shardings)(rng)
  if config.model.text.pretrained:  # Adam's moments are zeros of the same shapes: only params change.
    model_params = load_pretrained_text(state.params["model"], config.model)
    state = state.replace(params={**state.params, "model": model_params})
  return state, shardings
