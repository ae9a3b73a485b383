"""The moment-retrieval model side: Hungarian matching against brute force, the QD-DETR's padding invariance and
mismatched-query pass, the loss terms against numpy float64 references, finite gradients and a one-batch overfit."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from atr_jax.moments import losses, matching
from atr_jax.moments.model import MomentDETR
from configs.base import get_base_config


def _config():
  config = get_base_config().moments
  config.model.update(hidden_dim=16, num_heads=2, ffn_dim=32, num_cross_layers=1, num_encoder_layers=1, num_queries=5)
  return config


def _np_giou(a, b):
  inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
  union = (a[1] - a[0]) + (b[1] - b[0]) - inter
  hull = max(a[1], b[1]) - min(a[0], b[0])
  return inter / union - (hull - union) / hull


def _np_cost(logits, spans, windows, config):
  """(Q, W) float64 matching cost of one recording."""
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p_fg = (p / p.sum(-1, keepdims=True))[:, 0]
  cost = np.zeros((len(spans), len(windows)))
  for q, (c, w) in enumerate(spans.astype(np.float64)):
    for j, (s, e) in enumerate(windows.astype(np.float64)):
      l1 = abs(c - (s + e) / 2) + abs(w - (e - s))
      giou = _np_giou((c - w / 2, c + w / 2), (s, e))
      cost[q, j] = config.span_weight * l1 - config.giou_weight * giou - config.label_weight * p_fg[q]
  return cost


def _brute_force(cost):
  """Minimum-cost injective map windows -> queries, by trying every one."""
  num_queries, num_windows = cost.shape
  best = min(
    itertools.permutations(range(num_queries), num_windows),
    key=lambda queries: sum(cost[q, w] for w, q in enumerate(queries)),
  )
  return np.array(best)


def _random_predictions(rng, batch, num_queries, num_windows):
  logits = rng.normal(size=(batch, num_queries, 2)).astype(np.float32)
  spans = np.stack([rng.uniform(0.1, 0.9, (batch, num_queries)), rng.uniform(0.05, 0.5, (batch, num_queries))], -1)
  starts = rng.uniform(0, 0.7, (batch, num_windows))
  windows = np.stack([starts, starts + rng.uniform(0.02, 0.3, (batch, num_windows))], -1)
  return logits, spans.astype(np.float32), windows.astype(np.float32)


def test_matching_against_brute_force():
  config = _config().loss
  rng = np.random.default_rng(0)
  logits, spans, windows = _random_predictions(rng, batch=6, num_queries=5, num_windows=4)
  window_mask = np.ones((6, 4), bool)
  window_mask[1, 2:] = False
  window_mask[3, 1:] = False
  window_mask[4, 0] = False  # A padded window first: the valid ones are still found.
  cost = np.asarray(matching.match_costs(jnp.asarray(logits), jnp.asarray(spans), jnp.asarray(windows), config))
  matched = np.asarray(
    jax.jit(lambda *a: matching.match(*a, config))(logits, spans, windows, window_mask)  # Under jit (pure_callback).
  )
  for b in range(6):
    reference_cost = _np_cost(logits[b], spans[b], windows[b], config)
    np.testing.assert_allclose(cost[b], reference_cost, rtol=1e-5, atol=1e-5)
    valid = np.flatnonzero(window_mask[b])
    np.testing.assert_array_equal(matched[b, valid], _brute_force(reference_cost[:, valid]))
    assert (matched[b, ~window_mask[b]] == -1).all()


def test_more_windows_than_queries_leave_the_worst_unmatched():
  rng = np.random.default_rng(1)
  cost = rng.normal(size=(1, 2, 3))
  matched = matching.hungarian(cost, np.ones((1, 3), bool))[0]
  assert sorted(matched[matched >= 0]) == [0, 1] and (matched == -1).sum() == 1
  best = min(itertools.permutations(range(3), 2), key=lambda windows: cost[0, 0, windows[0]] + cost[0, 1, windows[1]])
  assert matched[best[0]] == 0 and matched[best[1]] == 1


def _inputs(rng, lengths, text_lengths, num_frames, num_tokens, dim=12):
  """A batch padded to (num_frames, num_tokens) with random values (not zeros) in the padding."""
  batch = len(lengths)
  audio = rng.normal(size=(batch, num_frames, dim + 2)).astype(np.float32)
  text = rng.normal(size=(batch, num_tokens, dim)).astype(np.float32)
  audio_mask = np.arange(num_frames)[None] < np.array(lengths)[:, None]
  text_mask = np.arange(num_tokens)[None] < np.array(text_lengths)[:, None]
  return audio, audio_mask, text, text_mask


@pytest.mark.slow
def test_padding_changes_no_prediction_and_the_negative_pass_shifts_the_text():
  config = _config().model
  model = MomentDETR(config)
  rng = np.random.default_rng(2)
  lengths, text_lengths = [9, 13], [5, 3]
  audio, audio_mask, text, text_mask = _inputs(rng, lengths, text_lengths, num_frames=17, num_tokens=8)
  variables = model.init(jax.random.key(0), audio, audio_mask, text, text_mask, train=False)
  apply = jax.jit(model.apply, static_argnames=("train", "negative"))
  padded = apply(variables, audio, audio_mask, text, text_mask, train=False, negative=True)
  for i in range(2):
    alone = apply(
      variables,
      audio[i : i + 1, : lengths[i]],
      audio_mask[i : i + 1, : lengths[i]],
      text[i : i + 1, : text_lengths[i]],
      text_mask[i : i + 1, : text_lengths[i]],
      train=False,
    )
    np.testing.assert_allclose(padded["logits"][:, i], alone["logits"][:, 0], atol=1e-5)
    np.testing.assert_allclose(padded["spans"][:, i], alone["spans"][:, 0], atol=1e-5)
    np.testing.assert_allclose(padded["saliency"][i, : lengths[i]], alone["saliency"][0], atol=1e-5)
    # The mismatched pass: recording i against query i + 1 (cyclically).
    j = (i + 1) % 2
    mismatched = apply(
      variables,
      audio[i : i + 1, : lengths[i]],
      audio_mask[i : i + 1, : lengths[i]],
      text[j : j + 1, : text_lengths[j]],
      text_mask[j : j + 1, : text_lengths[j]],
      train=False,
    )
    np.testing.assert_allclose(padded["saliency_negative"][i, : lengths[i]], mismatched["saliency"][0], atol=1e-5)
  assert padded["spans"].shape == (config.num_decoder_layers, 2, config.num_queries, 2)
  assert np.all((padded["spans"] > 0) & (padded["spans"] < 1))
  # The decoder layers refine: the second layer's spans differ from the first's.
  assert np.abs(padded["spans"][1] - padded["spans"][0]).max() > 1e-4


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_parameters():
  config = _config().model
  audio, audio_mask, text, text_mask = _inputs(np.random.default_rng(3), [7, 5], [4, 6], 8, 6)
  variables = MomentDETR(config).init(jax.random.key(0), audio, audio_mask, text, text_mask, train=False)
  config.dtype = "bfloat16"
  outputs = MomentDETR(config).apply(variables, audio, audio_mask, text, text_mask, train=False)
  reference = MomentDETR(_config().model).apply(variables, audio, audio_mask, text, text_mask, train=False)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  assert outputs["spans"].dtype == jnp.float32
  np.testing.assert_allclose(outputs["spans"], reference["spans"], atol=0.05)
  config.dtype = "float16"
  with pytest.raises(ValueError, match="moments.model.dtype"):
    MomentDETR(config).apply(variables, audio, audio_mask, text, text_mask, train=False)


def test_set_losses_against_numpy():
  config = _config().loss
  rng = np.random.default_rng(4)
  logits, spans, windows = _random_predictions(rng, batch=3, num_queries=4, num_windows=3)
  window_mask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]], bool)
  terms = losses.set_losses(jnp.asarray(logits), jnp.asarray(spans), windows, window_mask, config)
  l1, gious, nll = [], [], []
  for b in range(3):
    valid = np.flatnonzero(window_mask[b])
    cost = _np_cost(logits[b], spans[b], windows[b], config)[:, valid]
    queries = _brute_force(cost)
    for q, w in zip(queries, valid):
      c, width = spans[b, q].astype(np.float64)
      s, e = windows[b, w].astype(np.float64)
      l1 += [abs(c - (s + e) / 2), abs(width - (e - s))]
      gious.append(1 - _np_giou((c - width / 2, c + width / 2), (s, e)))
    log_p = logits[b] - np.log(np.exp(logits[b]).sum(-1, keepdims=True))
    for q in range(4):
      nll.append(-log_p[q, 0] if q in queries else -config.background_weight * log_p[q, 1])
  np.testing.assert_allclose(terms["span"], np.mean(l1), rtol=1e-5)
  np.testing.assert_allclose(terms["giou"], np.mean(gious), rtol=1e-5)
  np.testing.assert_allclose(terms["label"], np.mean(nll), rtol=1e-5)


def test_saliency_labels_from_the_first_window():
  audio_mask = np.arange(10)[None] < np.array([[10], [6], [10]])
  first = np.array([[0.2, 0.45], [0.5, 1.0], [0.95, 1.0]], np.float32)
  labels = np.asarray(losses.saliency_labels(first, audio_mask))
  np.testing.assert_array_equal(np.flatnonzero(labels[0]), [2, 3])  # floor(2) .. floor(4.5) - 1
  np.testing.assert_array_equal(np.flatnonzero(labels[1]), [3, 4, 5])  # 6 valid frames: floor(3) .. 6 - 1
  np.testing.assert_array_equal(np.flatnonzero(labels[2]), [9])  # start clamped to the end frame


def test_saliency_losses_against_numpy():
  config = _config().loss
  rng = np.random.default_rng(5)
  batch, frames = 4, 12
  audio_mask = np.arange(frames)[None] < np.array([[12], [9], [12], [7]])
  labels = np.zeros((batch, frames), bool)
  labels[0, 2:6], labels[1, 0:3], labels[2, 5:12], labels[3, 6] = True, True, True, True
  # Every inside frame of a row scores a_b, every outside frame c_b: the hinge is the same whatever frames are drawn.
  a, c = rng.normal(size=batch), rng.normal(size=batch)
  saliency = np.where(labels, a[:, None], c[:, None]).astype(np.float32)
  saliency = np.where(audio_mask, saliency, rng.normal(size=(batch, frames))).astype(np.float32)
  negative = rng.normal(size=(batch, frames)).astype(np.float32)
  terms = losses.saliency_losses(saliency, negative, labels, audio_mask, jax.random.key(0), config)

  m, tau = config.saliency_margin, config.rank_tau
  hinge = sum(config.saliency_pairs * max(0.0, m + c[b] - a[b]) for b in range(batch))
  np.testing.assert_allclose(terms["saliency_hinge"], hinge / (batch * config.saliency_pairs) * 2, rtol=1e-5)

  rank = 0.0
  for b in range(batch):
    valid = np.concatenate([saliency[b][audio_mask[b]], negative[b][audio_mask[b]]]).astype(np.float64) / tau
    log_softmax = valid - np.log(np.exp(valid).sum())
    inside = labels[b][audio_mask[b]]  # The mismatched query's frames are all outside.
    rank += -np.mean(log_softmax[: len(inside)][inside])
  np.testing.assert_allclose(terms["saliency_rank"], rank / batch / 12, rtol=1e-4)

  softplus = np.log1p(np.exp(negative.astype(np.float64)))
  np.testing.assert_allclose(terms["saliency_negative"], (softplus * audio_mask).sum(-1).mean(), rtol=1e-5)


def test_hinge_draws_frames_inside_and_outside():
  """With distinct scores the hinge is one of the values its draws allow, and never uses a padded frame."""
  config = _config().loss
  labels = np.zeros((1, 8), bool)
  labels[0, 1:4] = True
  audio_mask = np.arange(8)[None] < 6
  saliency = np.array([[0.0, 0.1, 0.3, 0.6, 0.5, 0.7, 100.0, 100.0]], np.float32)  # Padded frames: huge.
  seen = set()
  for seed in range(8):
    terms = losses.saliency_losses(saliency, saliency, labels, audio_mask, jax.random.key(seed), config)
    seen.add(round(float(terms["saliency_hinge"]), 5))
  assert max(seen) < 2.0 and len(seen) > 1  # A padded frame drawn as outside would give ~100.


def _batch(rng, batch=4, frames=16, tokens=6, dim=12):
  lengths = rng.integers(10, frames + 1, batch)
  audio, audio_mask, text, text_mask = _inputs(rng, lengths, rng.integers(2, tokens + 1, batch), frames, tokens, dim)
  starts = rng.uniform(0, 0.6, (batch, 2))
  windows = np.stack([starts, starts + rng.uniform(0.1, 0.35, (batch, 2))], -1).astype(np.float32)
  window_mask = np.array([[1, 1], [1, 0], [1, 1], [1, 0]], bool)[:batch]
  inputs = dict(audio=audio, audio_mask=audio_mask, text=text, text_mask=text_mask)
  return inputs, dict(windows=windows, window_mask=window_mask, audio_mask=audio_mask)


@pytest.mark.slow
def test_gradients_are_finite_and_one_batch_overfits():
  config = _config()
  config.model.update(dropout=0.0, input_dropout=0.0)
  model = MomentDETR(config.model)
  inputs, targets = _batch(np.random.default_rng(6))
  params = model.init(jax.random.key(0), **inputs, train=False)["params"]
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(params):
      outputs = model.apply({"params": params}, **inputs, train=True, negative=True)
      return losses.moment_loss(outputs, targets, jax.random.key(1), config.loss)

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss, terms, grads

  params, opt_state, first, terms, grads = step(params, opt_state)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  assert set(terms) == {"span", "giou", "label", "saliency_hinge", "saliency_rank", "saliency_negative"}
  assert all(float(v) > 0 for v in terms.values())
  for _ in range(40):
    params, opt_state, loss, _, _ = step(params, opt_state)
  assert float(loss) < 0.5 * float(first)


def test_set_losses_with_more_windows_than_queries_count_matched_pairs_only():
  config = _config().loss
  rng = np.random.default_rng(7)
  logits, spans, windows = _random_predictions(rng, batch=1, num_queries=2, num_windows=4)
  terms = losses.set_losses(jnp.asarray(logits), jnp.asarray(spans), windows, np.ones((1, 4), bool), config)
  cost = _np_cost(logits[0], spans[0], windows[0], config)
  chosen = min(itertools.permutations(range(4), 2), key=lambda w: cost[0, w[0]] + cost[1, w[1]])
  l1, gious = [], []
  for q, w in enumerate(chosen):
    c, width = spans[0, q].astype(np.float64)
    s, e = windows[0, w].astype(np.float64)
    l1 += [abs(c - (s + e) / 2), abs(width - (e - s))]
    gious.append(1 - _np_giou((c - width / 2, c + width / 2), (s, e)))
  np.testing.assert_allclose(terms["span"], np.mean(l1), rtol=1e-5)
  np.testing.assert_allclose(terms["giou"], np.mean(gious), rtol=1e-5)
  log_p = logits[0] - np.log(np.exp(logits[0]).sum(-1, keepdims=True))
  np.testing.assert_allclose(terms["label"], -log_p[:, 0].mean(), rtol=1e-5)  # Both queries are foreground.
