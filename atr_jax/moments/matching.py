"""Span geometry and the Hungarian matching of predicted spans to ground-truth windows (SPEC 12).

Spans are normalised by the recording's duration: predictions as (centre, width), windows as [start, end]. The
matching cost of query q and window w is span_weight |(c, w)_q - (c, w)_w|_1 - giou_weight gIoU - label_weight
p_fg(q) (DETR's costs; the loss weights serve as the costs). The assignment runs on the host
(scipy.optimize.linear_sum_assignment) through `jax.pure_callback`, so it can sit inside a jitted loss.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy.optimize import linear_sum_assignment

FOREGROUND = 0  # Index of the foreground class in the two-way logits (1 = background).


def cxw_to_xx(spans: jax.Array) -> jax.Array:
  """(..., 2) (centre, width) -> (..., 2) [start, end]."""
  centre, width = spans[..., 0], spans[..., 1]
  return jnp.stack([centre - width / 2, centre + width / 2], -1)


def xx_to_cxw(windows: jax.Array) -> jax.Array:
  """(..., 2) [start, end] -> (..., 2) (centre, width)."""
  start, end = windows[..., 0], windows[..., 1]
  return jnp.stack([(start + end) / 2, end - start], -1)


def generalized_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """gIoU of [start, end] spans, broadcasting a (..., 2) against b (..., 2): IoU - (hull - union) / hull."""
  intersection = jnp.clip(jnp.minimum(a[..., 1], b[..., 1]) - jnp.maximum(a[..., 0], b[..., 0]), 0)
  union = (a[..., 1] - a[..., 0]) + (b[..., 1] - b[..., 0]) - intersection
  hull = jnp.maximum(a[..., 1], b[..., 1]) - jnp.minimum(a[..., 0], b[..., 0])
  return intersection / union - (hull - union) / hull


def match_costs(
  logits: jax.Array, spans: jax.Array, windows: jax.Array, loss_config: ml_collections.ConfigDict
) -> jax.Array:
  """(B, Q, W) cost of giving window w to query q: logits (B, Q, 2), spans (B, Q, 2) (centre, width), windows
  (B, W, 2) [start, end]."""
  p_fg = jax.nn.softmax(logits.astype(jnp.float32), -1)[..., FOREGROUND]
  spans = spans.astype(jnp.float32)
  l1 = jnp.abs(spans[:, :, None, :] - xx_to_cxw(windows)[:, None, :, :]).sum(-1)
  giou = generalized_iou(cxw_to_xx(spans)[:, :, None, :], windows[:, None, :, :])
  return loss_config.span_weight * l1 - loss_config.giou_weight * giou - loss_config.label_weight * p_fg[..., None]


def hungarian(cost: np.ndarray, window_mask: np.ndarray) -> np.ndarray:
  """(B, W) int32: the query matched to each window (the minimum-cost one-to-one assignment of each row's valid
  windows), -1 for padded windows and for windows left over when a row has more windows than queries."""
  cost, window_mask = np.asarray(cost), np.asarray(window_mask, bool)
  matched = np.full(window_mask.shape, -1, np.int32)
  for b in range(cost.shape[0]):
    valid = np.flatnonzero(window_mask[b])
    queries, columns = linear_sum_assignment(cost[b][:, valid])
    matched[b, valid[columns]] = queries
  return matched


def match(
  logits: jax.Array,
  spans: jax.Array,
  windows: jax.Array,
  window_mask: jax.Array,
  loss_config: ml_collections.ConfigDict,
) -> jax.Array:
  """`hungarian` of `match_costs` as a (B, W) int32 array (no gradient), usable under jit."""
  cost = jax.lax.stop_gradient(match_costs(logits, spans, windows, loss_config))
  shape = jax.ShapeDtypeStruct(window_mask.shape, jnp.int32)
  return jax.pure_callback(hungarian, shape, cost, window_mask, vmap_method="sequential")
