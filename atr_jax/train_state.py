"""The train state (params = {'model', 'loss'}, Adam state, BatchNorm statistics) and how it is born: replicated
over the mesh through `jax.eval_shape` + jit `out_shardings`, with pretrained text weights and converted PANNs audio
weights (`model.audio.init_from`) loaded; the optimizer with frozen subtrees and per-tower learning rates."""
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from atr_jax import losses, sharding
from atr_jax.models import panns
from atr_jax.models.dual_encoder import load_pretrained_text, with_frozen_towers_in_inference

FREEZABLE = ("audio", "text", "audio_head", "text_head")


class TrainState(train_state.TrainState):
  batch_stats: Any


def make_optimizer(optim_config: ml_collections.ConfigDict, steps_per_epoch: int):
  """Adam with the reference's step decay, after global-norm clipping. Each top-level model subtree gets a label:
  'frozen' (listed in `optim.frozen`: gradients zeroed before clipping, no update, no Adam state), 'text' (the
  BERT body, when `optim.text_learning_rate` is set: its own Adam) or 'rest'. Returns (tx, main schedule)."""
  frozen = tuple(optim_config.get("frozen", ()))
  unknown = sorted(set(frozen) - set(FREEZABLE))
  if unknown:
    raise ValueError(f"optim.frozen holds {unknown}; freezable subtrees are {FREEZABLE}")

  def step_decay(learning_rate):
    return optax.exponential_decay(
        init_value=learning_rate, transition_steps=optim_config.decay_every_epochs * steps_per_epoch,
        decay_rate=optim_config.decay_factor, staircase=True)

  def label(name):
    if name in frozen:
      return "frozen"
    return "text" if name == "text" and optim_config.text_learning_rate is not None else "rest"

  def labels(params):
    return {"model": {name: jax.tree.map(lambda _: label(name), subtree)
                      for name, subtree in params["model"].items()},
            "loss": jax.tree.map(lambda _: "rest", params["loss"])}

  schedule = step_decay(optim_config.learning_rate)
  updates = {"rest": optax.adam(schedule), "frozen": optax.set_to_zero()}
  if optim_config.text_learning_rate is not None:
    updates["text"] = optax.adam(step_decay(optim_config.text_learning_rate))
  parts = []
  if frozen:  # Frozen gradients must not count in the clipping norm.
    parts.append(optax.multi_transform({name: optax.set_to_zero() if name == "frozen" else optax.identity()
                                        for name in updates}, labels))
  if optim_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  return optax.chain(*parts, optax.multi_transform(updates, labels)), schedule


def _load_audio_init(state: TrainState, directory: str) -> TrainState:
  """`state` with the audio tower's params and batch_stats replaced by the converted weights in `directory`."""
  audio = {"params": state.params["model"]["audio"], "batch_stats": state.batch_stats["audio"]}
  loaded = panns.load_audio_variables(directory, audio)
  placed = sharding.place_like(loaded, audio)
  model_params = {**state.params["model"], "audio": placed["params"]}
  return state.replace(params={**state.params, "model": model_params},
                       batch_stats={**state.batch_stats, "audio": placed["batch_stats"]})


def create_train_state(config: ml_collections.ConfigDict, model, tx, mesh, rng):
  """A replicated train state (params = {'model', 'loss'}) and its shardings; pretrained text weights loaded, and
  the audio tower from `model.audio.init_from` when set. The state's apply_fn runs frozen towers (optim.frozen) in
  inference mode when `model.frozen_in_inference_mode` is True."""
  model = with_frozen_towers_in_inference(model, tuple(config.optim.get("frozen", ())),
                                          config.model.get("frozen_in_inference_mode", True))
  frames = config.data.train_max_frames
  dummy = (np.zeros((1, frames, 64), np.float32), np.ones((1, frames), bool),
           np.zeros((1, config.model.text.max_len), np.int32), np.ones((1, config.model.text.max_len), np.int32))

  def init(rng):
    variables = model.init({"params": rng, "dropout": rng, "augment": rng}, *dummy, train=False)
    loss_params = losses.init_loss_params_from_config(config.loss)
    return TrainState.create(apply_fn=model.apply, params={"model": variables["params"], "loss": loss_params},
                             tx=tx, batch_stats=variables["batch_stats"])

  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), jax.eval_shape(init, rng))
  state = jax.jit(init, out_shardings=shardings)(rng)
  if config.model.text.pretrained:  # Adam's moments are zeros of the same shapes: only params change.
    model_params = load_pretrained_text(state.params["model"], config.model)
    state = state.replace(params={**state.params, "model": model_params})
  if config.model.audio.get("init_from", ""):
    state = _load_audio_init(state, config.model.audio.init_from)
  return state, shardings
