"""The moment-model benchmark: the PyTorch QD-DETR (scripts/torch_qd_detr.py) does our step's work (with our Flax
weights copied in: the same outputs, loss terms, gradients and two AdamW steps; the same parameter count at the
default size), and scripts/benchmark_moments.py prints its table at a tiny size."""

import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from atr_jax import sharding
from atr_jax.moments import losses, train
from atr_jax.moments.model import MomentDETR
from configs.base import get_base_config
from scripts import benchmark_moments, torch_qd_detr

D = 12  # Token features; frames have D + 2.
TINY = ["--batch=8", "--frames=20", "--tokens=7", f"--feature_dim={D}", "--max_windows=3"]


def _config():
  config = get_base_config().moments
  config.model.update(hidden_dim=32, num_heads=4, ffn_dim=48, num_queries=6, dropout=0.0, input_dropout=0.0)
  config.model.update(num_cross_layers=1, num_encoder_layers=1)  # Cheaper compiles; the decoder keeps 2 layers.
  config.train.update(learning_rate=1e-2, weight_decay=0.5, global_batch_size=8)  # Large: the update shows.
  return config


def _batches(count):
  args = benchmark_moments.parse_args(TINY)
  return [benchmark_moments.make_batch(args, i) for i in range(count)]


def _torch_batch(batch):
  return {k: torch.tensor(v) for k, v in batch.items()}


def _our_pairs(loss_rng, batch, loss_config):
  """The (inside, outside) hinge frames `losses.saliency_losses` draws with `loss_rng`, as torch indices."""
  labels = losses.saliency_labels(batch["windows"][:, 0], batch["audio_mask"])
  inside_rng, outside_rng = jax.random.split(loss_rng)
  inside = losses._draw(inside_rng, labels, loss_config.saliency_pairs)
  eligible = batch["audio_mask"] & ~labels
  outside = np.where(
    eligible.any(-1, keepdims=True), losses._draw(outside_rng, eligible, loss_config.saliency_pairs), inside
  )
  return torch.tensor(np.asarray(inside), dtype=torch.long), torch.tensor(np.asarray(outside), dtype=torch.long)


def _torch_model(config, params):
  model = torch_qd_detr.QDDETR(config.model, D + 2, D)
  torch_qd_detr.load_flax_params(model, jax.device_get(params))
  return model


def _assert_tree_matches(named: dict, tree, skip=(), **tolerance):
  """`named` torch-named arrays against our parameter-shaped `tree` (Dense kernels transposed)."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  assert len(leaves) == len(named)
  for path, value in leaves:
    *stem, leaf = [key.key for key in path]
    name = ".".join(stem + [{"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])
    if name.endswith(skip):
      continue
    other = named[name].T if leaf == "kernel" else named[name]
    np.testing.assert_allclose(other, np.asarray(value), err_msg=name, **tolerance)


def test_parameter_counts_are_equal_at_the_default_size():
  config = get_base_config().moments
  dummy = (np.zeros((1, 4, 514), np.float32), np.ones((1, 4), bool), np.zeros((1, 2, 512), np.float32))
  shapes = jax.eval_shape(
    lambda: MomentDETR(config.model).init(jax.random.key(0), *dummy, np.ones((1, 2), bool), train=False)
  )
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  theirs = sum(p.numel() for p in torch_qd_detr.QDDETR(config.model, 514, 512).parameters())
  assert ours == theirs > 6_000_000


def test_outputs_loss_terms_and_gradients_match_ours():
  config = _config()
  batch = _batches(1)[0]
  inputs = (batch["audio"], batch["audio_mask"], batch["text"], batch["text_mask"])
  model = MomentDETR(config.model)
  params = jax.jit(lambda rng: model.init(rng, *inputs, train=False)["params"])(jax.random.key(0))
  loss_rng = jax.random.key(1)

  def loss_fn(params):
    outputs = model.apply({"params": params}, *inputs, train=True, negative=True)  # Dropout rates are 0.
    total, terms = losses.moment_loss(outputs, batch, loss_rng, config.loss)
    return total, (terms, outputs)

  (total, (terms, outputs)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  torch_model = _torch_model(config, params)
  torch_batch = _torch_batch(batch)
  torch_outputs = torch_model(*(torch_batch[k] for k in ("audio", "audio_mask", "text", "text_mask")), negative=True)
  for name, value in outputs.items():
    np.testing.assert_allclose(torch_outputs[name].detach().numpy(), value, atol=2e-5, err_msg=name)
  pairs = _our_pairs(loss_rng, batch, config.loss)
  torch_total, torch_terms = torch_qd_detr.moment_loss(torch_outputs, torch_batch, config.loss, pairs=pairs)
  assert set(torch_terms) == set(terms)
  for name, value in terms.items():
    np.testing.assert_allclose(torch_terms[name].item(), float(value), rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(torch_total.item(), float(total), rtol=1e-5)
  torch_total.backward()
  named_grads = {name: p.grad.numpy() for name, p in torch_model.named_parameters()}
  _assert_tree_matches(named_grads, grads, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_two_clipped_adamw_steps_match_ours():
  config = _config()
  mesh = sharding.create_mesh()
  state, _ = train.create_state(config, (D + 2, D), mesh, jax.random.key(0))
  torch_model = _torch_model(config, state.params)
  optimizer = torch_qd_detr.make_optimizer(torch_model, config.train)
  torch_step = torch_qd_detr.make_train_step(torch_model, optimizer, config)
  our_step = train.make_train_step(config)
  for i, batch in enumerate(_batches(2)):
    rng = jax.random.key(10 + i)
    state, scalars = our_step(state, sharding.global_batch(batch, mesh), rng)
    _, loss_rng = jax.random.split(rng)  # make_train_step's (dropout, loss) split.
    total, _ = torch_step(_torch_batch(batch), _our_pairs(loss_rng, batch, config.loss))
    np.testing.assert_allclose(float(total), float(scalars["loss"]), rtol=1e-5)
  named = {name: p.detach().numpy() for name, p in torch_model.named_parameters()}
  # Attention key biases have no gradient (a softmax ignores a shift of its logits); Adam turns their float noise
  # (~1e-8 on both sides) into steps of any size up to the learning rate.
  _assert_tree_matches(named, state.params, skip=("key.bias", "key_pos.bias"), rtol=1e-4, atol=5e-5)


@pytest.mark.slow
def test_benchmark_prints_both_rows():
  command = [sys.executable, "-m", "scripts.benchmark_moments", *TINY, "--repeats=2", "--warmup=1"]
  output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
  lines = [line for line in output.splitlines() if line.startswith("|")]
  assert [cell.strip() for cell in lines[0].strip("|").split("|")] == [
    "framework (fp32)",
    "parameters",
    "init s",
    "compile s",
    "step ms median (min-max)",
    "peak RSS MB",
    "ours / that",
  ]
  rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
  assert [row[0].split()[0] for row in rows] == ["ours", "PyTorch"]
  assert rows[0][1] == rows[1][1]  # Parameter counts.
  assert rows[1][3] == rows[0][6] == "-"  # PyTorch compiles nothing; ours is the ratios' numerator.
  for row in rows:
    median, low, high = map(float, re.fullmatch(r"([\d.]+) \(([\d.]+)-([\d.]+)\)", row[4]).groups())
    assert 0 < low <= median <= high
    numbers = [float(x.replace(",", "")) for x in (row[2], row[3], row[5], row[6]) if x != "-"]
    assert len(numbers) == 3 and all(np.isfinite(x) and x > 0 for x in numbers)
