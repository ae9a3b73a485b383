"""The training step's options against their plain equivalents: gradient caching (micro-batches) equals the step
written out per micro-batch, FSDP equals replication, rematerialisation changes nothing, bf16 compute keeps float32
parameters; the schedules, AdamW's decay mask and reduce-on-plateau against optax/PyTorch semantics."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny_run import tiny_config

from atr_jax import losses, sharding
from atr_jax.models.cnn14 import BatchNorm
from atr_jax.models.dual_encoder import build_model
from atr_jax.train import _forward, train_step
from atr_jax.train_state import create_train_state, make_optimizer, make_schedule, reduce_on_plateau


def _batch(config, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  b, t, tokens = config.train.global_batch_size, config.data.train_max_frames, config.model.text.max_len
  lengths = rng.integers(tokens // 2, tokens + 1, b)
  return {
    "log_mel": (rng.standard_normal((b, t, 64)) * 10 - 40).astype(np.float32),
    "frame_mask": np.arange(t)[None] < rng.integers(t // 2, t + 1, b)[:, None],
    "input_ids": rng.integers(1000, 2000, (b, tokens)).astype(np.int32),
    "attention_mask": (np.arange(tokens)[None] < lengths[:, None]).astype(np.int32),
    "clip_id": rng.integers(0, b // 2, b).astype(np.int32),
  }


def _jit_step(config, mesh, shardings, accum_steps: int):
  loss_fn = losses.make_loss_fn_from_config(config.loss, mesh)
  # An 'rbg' key: XLA CPU compiles threefry's random bits (dropout, SpecAugment) slowly; the comparisons below are
  # between runs on the same mesh and batch sharding, which draw the same bits either way.
  return jax.jit(
    functools.partial(
      train_step, loss_fn=loss_fn, rng=jax.random.key(1, impl="rbg"), accum_steps=accum_steps, num_shards=mesh.size
    ),
    in_shardings=(shardings, sharding.batch_sharding(mesh)),
    out_shardings=(shardings, sharding.replicated(mesh)),
    # Less LLVM optimisation: compiles in a third of the time, computes the same function.
    compiler_options={"xla_backend_optimization_level": 0},
  )


def _run_steps(config, num_steps: int = 2, accum_steps: int = 1):
  """Params and losses after `num_steps` steps of the config's model on fixed random batches."""
  mesh = sharding.create_mesh()
  model = build_model(config.model)
  tx, _ = make_optimizer(config.optim, steps_per_epoch=10)
  state, shardings = create_train_state(config, model, tx, mesh, jax.random.key(0, impl="rbg"))
  step = _jit_step(config, mesh, shardings, accum_steps)
  step_losses = []
  for i in range(num_steps):
    state, metrics = step(state, sharding.global_batch(_batch(config, i), mesh))
    step_losses.append(float(metrics["loss"]))
  return state, step_losses


_BASELINES = {}


def _baseline(config):
  """`_run_steps(config)`, computed once per distinct config in this test session."""
  key = config.to_json_best_effort()
  if key not in _BASELINES:
    _BASELINES[key] = _run_steps(config)
  return _BASELINES[key]


def _assert_trees_close(a, b, rtol, atol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(
      np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
    )


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("train_step")


@pytest.fixture
def config(config_dir):
  config = tiny_config(config_dir)  # One folder for every test: the same config, hence one `_baseline` run.
  config.train.global_batch_size = 32  # 4 rows on each of the 8 fake devices.
  config.data.train_max_frames = 64
  config.loss.learnable_temperature = True
  return config


def _gradient_recorder() -> optax.GradientTransformation:
  """An optimizer whose state is the last gradients it was given; it leaves the parameters unchanged."""
  return optax.GradientTransformation(
    init=lambda params: jax.tree.map(jnp.zeros_like, params),
    update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
  )


def _per_micro_batch_reference(apply_fn, params, batch_stats, batch: dict, loss_fn, accum_steps: int):
  """The loss over the whole batch of the model run on each micro-batch apart (micro-batch m = rows m, m + K, ...:
  one row per device), and {BatchNorm path: [(input, mask) per micro-batch]}."""
  inputs = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, BatchNorm) and context.method_name == "__call__":
      inputs.setdefault(context.module.path, []).append((args[0], kwargs["mask"]))
    return next_fun(*args, **kwargs)

  embeddings = []
  with nn.intercept_methods(record):
    for m in range(accum_steps):
      micro = jax.tree.map(lambda x: x[m::accum_steps], batch)
      emb, _ = apply_fn(
        {"params": params["model"], "batch_stats": batch_stats},
        micro["log_mel"],
        micro["frame_mask"],
        micro["input_ids"],
        micro["attention_mask"],
        train=True,
        mutable=["batch_stats"],
      )
      embeddings.append(emb)
  audio, text = (jnp.stack(e, axis=1).reshape(len(batch["clip_id"]), -1) for e in zip(*embeddings))
  return loss_fn(audio, text, batch["clip_id"], params["loss"]), inputs


@pytest.mark.slow
def test_micro_batches_equal_per_micro_batch_reference(config):
  # A trainable CNN14 without dropout and SpecAugment (whose random bits no reference could share): gradient caching
  # must give the loss and gradients of the step written out per micro-batch (BatchNorm normalising each micro-batch
  # by its own moments), and running statistics after one momentum update from each layer's moments over all
  # micro-batches' valid positions (the variance unbiased over their total count, as PyTorch's).
  config.model.audio.spec_augment, config.model.audio.dropout, config.model.text.dropout = False, 0.0, 0.0
  accum_steps = 4  # 1 row per device in each micro-batch.
  mesh = sharding.create_mesh()
  state, shardings = create_train_state(
    config, build_model(config.model), _gradient_recorder(), mesh, jax.random.key(0, impl="rbg")
  )
  batch = _batch(config, 0)
  new_state, metrics = _jit_step(config, mesh, shardings, accum_steps)(state, sharding.global_batch(batch, mesh))

  # On the same mesh and batch sharding: the early CNN14 gradients sum many nearly cancelling terms, so a different
  # reduction order (one device) moves them by up to 1e-2 relative, the same sharding by ~1e-5. Per-micro-batch
  # normalisation itself moves them by ~100% (against the one-batch gradient).
  loss_fn = losses.make_loss_fn_from_config(config.loss, None)
  reference = jax.value_and_grad(
    lambda params, batch: _per_micro_batch_reference(
      state.apply_fn, params, state.batch_stats, batch, loss_fn, accum_steps
    ),
    has_aux=True,
  )
  (loss, bn_inputs), grads = jax.jit(reference, compiler_options={"xla_backend_optimization_level": 0})(
    state.params, sharding.global_batch(batch, mesh)
  )
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  assert np.abs(grads["model"]["audio"]["conv_block1"]["conv1"]["kernel"]).max() > 0
  _assert_trees_close(new_state.opt_state, grads, rtol=1e-3, atol=1e-5)

  for (path, stat), start in zip(
    jax.tree_util.tree_leaves_with_path(new_state.batch_stats), jax.tree.leaves(state.batch_stats), strict=True
  ):
    inputs = bn_inputs[tuple(key.key for key in path[:-1])]
    x = np.concatenate([np.asarray(x, np.float64) for x, _ in inputs])
    valid = np.broadcast_to(np.concatenate([mask for _, mask in inputs]), x.shape[:-1] + (1,))
    axes = tuple(range(x.ndim - 1))
    mean = np.sum(x * valid, axes) / valid.sum()
    moment = mean if path[-1].key == "mean" else np.sum(np.square(x - mean) * valid, axes) / (valid.sum() - 1)
    np.testing.assert_allclose(
      stat, 0.9 * np.asarray(start, np.float64) + 0.1 * moment, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path)
    )


def _lowered_convolutions(config, frozen: tuple, accum_steps: int = 1) -> tuple[int, int]:
  """Convolutions in the lowered (unoptimised) training step with optim.frozen = `frozen`, and in the training-mode
  forward pass alone."""
  config.optim.frozen = frozen
  mesh = sharding.create_mesh()
  model = build_model(config.model)
  tx, _ = make_optimizer(config.optim, steps_per_epoch=10)
  state, _ = create_train_state(config, model, tx, mesh, jax.random.key(0, impl="rbg"))
  batch = sharding.global_batch(_batch(config, 0), mesh)
  step = functools.partial(
    train_step,
    loss_fn=losses.make_loss_fn_from_config(config.loss, mesh),
    rng=jax.random.key(1, impl="rbg"),
    accum_steps=accum_steps,
    num_shards=mesh.size,
    frozen=frozen,
  )
  forward = functools.partial(_forward, rng=jax.random.key(1, impl="rbg"))
  count = lambda fn, *args: jax.jit(fn).lower(*args).as_text().count("stablehlo.convolution")  # noqa: E731
  return (count(step, state, batch), count(lambda s, b: forward(s, s.params["model"], s.batch_stats, b), state, batch))


@pytest.mark.slow
@pytest.mark.parametrize("accum_steps", [1, 2])
def test_a_frozen_tower_is_not_back_propagated(config, accum_steps):
  passes = 1 if accum_steps == 1 else 2  # Gradient caching: the embedding pass, and the pass recomputed for autodiff.
  step_convolutions, forward_convolutions = _lowered_convolutions(config, (), accum_steps)
  assert step_convolutions > passes * forward_convolutions > 0  # Trainable: the backward pass adds convolutions.
  frozen_convolutions, frozen_forward = _lowered_convolutions(config, ("audio",), accum_steps)
  assert frozen_convolutions == passes * frozen_forward  # Frozen: the forward passes only.


@pytest.mark.slow
def test_the_learnt_temperature_is_reported(config):
  state, step_losses = _baseline(config)
  mesh = sharding.create_mesh()
  _, metrics = _jit_step(config, mesh, jax.tree.map(lambda x: x.sharding, state), 1)(
    state, sharding.global_batch(_batch(config, 5), mesh)
  )
  np.testing.assert_allclose(
    float(metrics["temperature"]), np.exp(float(state.params["loss"]["log_temperature"])), rtol=1e-6
  )
  assert float(metrics["temperature"]) != config.loss.temperature  # Two steps moved it.


@pytest.mark.slow
def test_fsdp_equals_replicated_and_shards_large_arrays(config):
  replicated, replicated_losses = _baseline(config)
  config.train.param_sharding = "fsdp"
  fsdp, fsdp_losses = _run_steps(config)
  np.testing.assert_allclose(fsdp_losses, replicated_losses, rtol=1e-5)
  _assert_trees_close(fsdp.params, replicated.params, rtol=1e-4, atol=1e-6)
  kernel = fsdp.params["model"]["text_head"]["fc1"]["kernel"]  # (32, 32): 1024 elements < FSDP_MIN_SIZE.
  big = fsdp.params["model"]["text"]["embeddings"]["word_embeddings"]["embedding"]  # (30522, 32)
  assert kernel.sharding.is_fully_replicated
  assert big.sharding.spec == jax.sharding.PartitionSpec("data") or big.sharding.spec[1] == "data"
  assert big.addressable_shards[0].data.size == big.size // 8
  adam_mu = [x for x in jax.tree.leaves(fsdp.opt_state) if x.shape == big.shape]
  assert adam_mu and all(x.sharding == big.sharding for x in adam_mu)


@pytest.mark.slow
def test_remat_changes_nothing(config):
  plain, plain_losses = _baseline(config)
  config.model.remat = True
  remat, remat_losses = _run_steps(config)
  assert jax.tree.structure(remat.params) == jax.tree.structure(plain.params)
  np.testing.assert_allclose(remat_losses, plain_losses, rtol=1e-5)
  _assert_trees_close(remat.params, plain.params, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_parameters(config):
  _, fp32_losses = _baseline(config)
  config.model.dtype = "bfloat16"
  bf16, bf16_losses = _run_steps(config)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16.params))
  assert all(
    x.dtype == jnp.float32
    for x in jax.tree.leaves(bf16.opt_state)
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
  )
  np.testing.assert_allclose(bf16_losses, fp32_losses, rtol=0.05)
  assert bf16_losses != fp32_losses  # The compute really ran in bfloat16.


def test_schedules(config):
  optim = config.optim
  optim.update(learning_rate=1e-3, decay_every_epochs=2, decay_factor=0.1, warmup_epochs=1.0)
  step = make_schedule(optim, 1e-3, steps_per_epoch=10, num_epochs=6)
  np.testing.assert_allclose([step(0), step(19), step(20), step(40)], [1e-3, 1e-3, 1e-4, 1e-5], rtol=1e-6)
  optim.schedule = "cosine"
  cosine = make_schedule(optim, 1e-3, steps_per_epoch=10, num_epochs=6)
  assert cosine(0) == 0 and abs(cosine(10) - 1e-3) < 1e-9 and cosine(5) == pytest.approx(5e-4)
  assert cosine(35) == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * 25 / 50)), rel=1e-5)
  assert cosine(60) == pytest.approx(0.0, abs=1e-12)
  # The DCASE 2025 baseline's shape: warm-up 1 epoch, cosine over the next 3 down to 1e-7, then 1e-7 to the end.
  optim.update(decay_epochs=3.0, end_learning_rate=1e-7)
  baseline = make_schedule(optim, 1e-3, steps_per_epoch=10, num_epochs=6)
  assert abs(baseline(10) - 1e-3) < 1e-9 and baseline(25) == pytest.approx(1e-7 + (1e-3 - 1e-7) * 0.5, rel=1e-5)
  assert baseline(40) == pytest.approx(1e-7, rel=1e-4) and baseline(59) == pytest.approx(1e-7, rel=1e-4)
  optim.decay_epochs = -1.0
  with pytest.raises(ValueError, match="optim.decay_epochs=-1.0"):
    make_schedule(optim, 1e-3, steps_per_epoch=10, num_epochs=6)
  optim.schedule = "plateau"
  assert make_schedule(optim, 1e-3, steps_per_epoch=10, num_epochs=6)(123) == pytest.approx(1e-3)
  optim.schedule = "linear"
  with pytest.raises(ValueError, match="optim.schedule='linear'"):
    make_schedule(optim, 1e-3, steps_per_epoch=10, num_epochs=6)


def test_adamw_decays_matrices_only(config):
  config.optim.update(name="adamw", weight_decay=0.1, learning_rate=1e-2, grad_clip_norm=0.0)
  tx, _ = make_optimizer(config.optim, steps_per_epoch=10)
  params = {"model": {"audio_head": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}, "loss": {}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["model"]["audio_head"]["kernel"], -1e-2 * 0.1 * np.ones((3, 2)), rtol=1e-6)
  np.testing.assert_array_equal(updates["model"]["audio_head"]["bias"], 0.0)
  config.optim.name = "sgd"
  with pytest.raises(ValueError, match="optim.name='sgd'"):
    make_optimizer(config.optim, steps_per_epoch=10)


def test_reduce_on_plateau_follows_pytorch(config):
  torch = pytest.importorskip("torch")
  config.optim.update(schedule="plateau", plateau_factor=0.5, plateau_patience=2, learning_rate=1.0)
  val_losses = [1.0, 0.9, 0.95, 0.91, 0.9, 0.89995, 0.92, 0.8, 0.85, 0.86, 0.87, 0.9, 0.9, 0.9, 0.9]
  optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
  scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=2)
  mesh = sharding.create_mesh()
  tx, _ = make_optimizer(config.optim, steps_per_epoch=10)
  state, _ = create_train_state(config, build_model(config.model), tx, mesh, jax.random.key(0, impl="rbg"))
  ours, theirs = [], []
  for val_loss in val_losses:
    state = reduce_on_plateau(state, val_loss, config.optim)
    scheduler.step(val_loss)
    ours.append(float(state.lr_scale))
    theirs.append(optimizer.param_groups[0]["lr"])
  np.testing.assert_allclose(ours, theirs, rtol=1e-6)
  assert min(ours) < 0.5  # The sequence really reduced, more than once.
