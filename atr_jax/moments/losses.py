"""QD-DETR's training losses (SPEC 12), each term returned apart, and their weighted total.

At every decoder layer, with that layer's Hungarian matching (`matching.match`):
- span: L1 between each matched (centre, width) and its window's, mean over matched pairs and the 2 coordinates;
- giou: 1 - gIoU of each matched pair, mean over matched pairs;
- label: 2-way cross-entropy of every query (foreground if matched), background weighted `background_weight`,
  plain mean over the batch's queries.
The three are summed over the decoder layers. Once, on the encoder's saliency (labels from the FIRST window: the
frames floor(start * n) .. min(floor(end * n), n) - 1 of the n valid frames are inside):
- saliency_hinge: `saliency_pairs` (inside, outside) frames drawn per recording, sum of relu(margin + s_out - s_in)
  / (B x pairs) x 2 (outside = inside when the window covers every frame);
- saliency_rank: rank-contrastive over the recording's frames and its mismatched-query frames (whose labels are 0),
  temperature `rank_tau`: -mean over inside frames of log softmax, mean over the batch; with 0/1 labels one of the
  upstream's 11 rank levels has positives and it divides by 12, as here;
- saliency_negative: sum over valid frames of -log(1 - sigmoid(s)) for the mismatched query, mean over the batch.
total = span_weight span + giou_weight giou + label_weight label + saliency_weight (the three saliency terms).

A batch: "windows" (B, W, 2) [start, end] as fractions of the recording's duration, "window_mask" (B, W) (the first
window of each recording valid), "audio_mask" (B, T).
"""

import jax
import jax.numpy as jnp
import ml_collections

from atr_jax.moments import matching

RANK_LEVELS = 12  # Upstream's normaliser of the rank-contrastive term (its loop visits levels 1..11).


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.where(mask, values, 0).sum() / jnp.maximum(mask.sum(), 1)


def set_losses(logits, spans, windows, window_mask, loss_config) -> dict[str, jax.Array]:
  """span, giou, label of one decoder layer: logits (B, Q, 2), spans (B, Q, 2), windows (B, W, 2)."""
  window_mask = window_mask.astype(bool)
  matched = matching.match(logits, spans, windows, window_mask, loss_config)  # (B, W) query index or -1
  valid = window_mask & (matched >= 0)
  predicted = jnp.take_along_axis(spans, jnp.maximum(matched, 0)[..., None], 1)  # (B, W, 2)
  target = matching.xx_to_cxw(windows)
  span = _masked_mean(jnp.abs(predicted - target).mean(-1), valid)
  giou = _masked_mean(1 - matching.generalized_iou(matching.cxw_to_xx(predicted), windows), valid)
  queries = jnp.arange(logits.shape[1])
  foreground = ((matched[:, None, :] == queries[None, :, None]) & valid[:, None, :]).any(-1)  # (B, Q)
  target_class = jnp.where(foreground, matching.FOREGROUND, 1 - matching.FOREGROUND)
  log_probs = jax.nn.log_softmax(logits, -1)
  nll = -jnp.take_along_axis(log_probs, target_class[..., None], -1)[..., 0]
  label = (nll * jnp.where(foreground, 1.0, loss_config.background_weight)).mean()
  return {"span": span, "giou": giou, "label": label}


def saliency_labels(first_window: jax.Array, audio_mask: jax.Array) -> jax.Array:
  """(B, T) bool: the valid frames inside each recording's first window (fractions -> frame indices)."""
  count = audio_mask.sum(-1).astype(jnp.float32)
  start = jnp.floor(first_window[:, 0] * count)
  end = jnp.maximum(jnp.minimum(jnp.floor(first_window[:, 1] * count), count) - 1, 0)
  start = jnp.minimum(start, end)
  frames = jnp.arange(audio_mask.shape[1], dtype=jnp.float32)
  return (frames >= start[:, None]) & (frames <= end[:, None]) & audio_mask


def _draw(rng, eligible: jax.Array, count: int) -> jax.Array:
  """(B, count) frame indices drawn without replacement from `eligible` (B, T); when a row has fewer, its first
  draw repeats (a row with none gives arbitrary indices: callers replace them)."""
  keys = jnp.where(eligible, jax.random.gumbel(rng, eligible.shape), -jnp.inf)
  values, indices = jax.lax.top_k(keys, count)
  return jnp.where(jnp.isfinite(values), indices, indices[:, :1])


def saliency_losses(saliency, saliency_negative, labels, audio_mask, rng, loss_config) -> dict[str, jax.Array]:
  """saliency_hinge, saliency_rank, saliency_negative from the (B, T) scores of the matched and mismatched queries."""
  audio_mask = audio_mask.astype(bool)
  pairs = loss_config.saliency_pairs
  inside_rng, outside_rng = jax.random.split(rng)
  inside = _draw(inside_rng, labels, pairs)
  outside_eligible = audio_mask & ~labels
  outside = jnp.where(outside_eligible.any(-1, keepdims=True), _draw(outside_rng, outside_eligible, pairs), inside)
  inside_scores = jnp.take_along_axis(saliency, inside, 1)
  outside_scores = jnp.take_along_axis(saliency, outside, 1)
  hinge = jax.nn.relu(loss_config.saliency_margin + outside_scores - inside_scores).sum() / inside.size * 2

  scores = jnp.concatenate([saliency, saliency_negative], 1)
  mask = jnp.concatenate([audio_mask, audio_mask], 1)
  positive = jnp.concatenate([labels, jnp.zeros_like(labels)], 1)
  logits = jnp.where(mask, scores, -1e3) / loss_config.rank_tau
  logits = logits - logits.max(-1, keepdims=True)
  log_prob = logits - jnp.log(jnp.exp(logits).sum(-1, keepdims=True) + 1e-6)
  mean_positive = jnp.where(positive & mask, log_prob, 0).sum(-1) / (positive.sum(-1) + 1e-6)
  rank = -(mean_positive * positive.any(-1)).mean() / RANK_LEVELS

  negative = jnp.where(audio_mask, jax.nn.softplus(saliency_negative), 0).sum(-1).mean()
  return {"saliency_hinge": hinge, "saliency_rank": rank, "saliency_negative": negative}


def moment_loss(
  outputs: dict, batch: dict, rng: jax.Array, loss_config: ml_collections.ConfigDict
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(total, terms) for the model's outputs (`MomentDETR(..., negative=True)`) on `batch` (see the docstring)."""
  terms = {"span": 0.0, "giou": 0.0, "label": 0.0}
  for logits, spans in zip(outputs["logits"], outputs["spans"]):
    for name, value in set_losses(logits, spans, batch["windows"], batch["window_mask"], loss_config).items():
      terms[name] = terms[name] + value
  labels = saliency_labels(batch["windows"][:, 0], batch["audio_mask"].astype(bool))
  terms.update(
    saliency_losses(outputs["saliency"], outputs["saliency_negative"], labels, batch["audio_mask"], rng, loss_config)
  )
  total = (
    loss_config.span_weight * terms["span"]
    + loss_config.giou_weight * terms["giou"]
    + loss_config.label_weight * terms["label"]
    + loss_config.saliency_weight * (terms["saliency_hinge"] + terms["saliency_rank"] + terms["saliency_negative"])
  )
  return total, terms
