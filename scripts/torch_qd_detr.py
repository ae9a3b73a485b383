"""A PyTorch QD-DETR (AM-DETR, SPEC 12) for the moment-model benchmark and its parity test, written from the
published description (SPEC 12 and the QD-DETR paper), with our Flax model's structure, sizes and loss terms
(`atr_jax.moments.model` / `losses` / `matching` state them) so that its training step does the same work.

- `QDDETR(model_config, audio_dim, text_dim)`: input projections, 2 audio-to-text cross-attention encoder layers,
  a global token and 2 self-attention layers, per-frame saliency against the global token, a DAB-style decoder of
  learnable (centre, width) anchors refined per layer, foreground and span heads. Submodules carry our parameter
  names, so `load_flax_params` copies a Flax parameter tree in (Dense kernels transposed) and the counts compare
  directly. LayerNorm epsilon is Flax's 1e-6 (PyTorch's default is 1e-5); initial weights are PyTorch's defaults.
- `moment_loss`: Hungarian matching on the host (scipy `linear_sum_assignment` of the same costs) and the span, gIoU
  and label terms at every decoder layer, plus the hinge, rank-contrastive and mismatched-query saliency terms. The
  hinge's (inside, outside) frames are `draw_pairs`'s unless given (the parity test passes ours).
- `make_train_step`: forward in training mode, loss, backward, global-norm clipping, AdamW.
Imports no JAX.
"""

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F

FOREGROUND = 0
RANK_LEVELS = 12
LAYER_NORM_EPS = 1e-6


def sine_embedding(x: torch.Tensor, dim: int) -> torch.Tensor:
  """(...,) -> (..., dim): interleaved sin, cos of 2 pi x at frequencies 10000^(-2i/dim)."""
  frequencies = 10000.0 ** (-torch.arange(dim // 2, dtype=torch.float32) * 2 / dim)
  angles = 2 * math.pi * x[..., None] * frequencies
  return torch.stack([angles.sin(), angles.cos()], -1).flatten(-2)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
  x = x.clamp(0, 1)
  return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _layer_norm(dim: int) -> nn.LayerNorm:
  return nn.LayerNorm(dim, eps=LAYER_NORM_EPS)


class Mlp(nn.Module):
  def __init__(self, in_dim, hidden_dim, out_dim, num_layers):
    super().__init__()
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    for i in range(num_layers):
      self.add_module(f"dense_{i}", nn.Linear(dims[i], dims[i + 1]))
    self.num_layers = num_layers

  def forward(self, x):
    for i in range(self.num_layers):
      x = getattr(self, f"dense_{i}")(x)
      if i < self.num_layers - 1:
        x = F.relu(x)
    return x


class InputProjection(nn.Module):
  def __init__(self, in_dim, config):
    super().__init__()
    self.num_layers = config.num_input_layers
    self.dropout = nn.Dropout(config.input_dropout)
    for i in range(self.num_layers):
      width = in_dim if i == 0 else config.hidden_dim
      self.add_module(f"norm_{i}", _layer_norm(width))
      self.add_module(f"dense_{i}", nn.Linear(width, config.hidden_dim))

  def forward(self, x):
    for i in range(self.num_layers):
      x = getattr(self, f"dense_{i}")(self.dropout(getattr(self, f"norm_{i}")(x)))
      if i < self.num_layers - 1:
        x = F.relu(x)
    return x


class Attention(nn.Module):
  """Multi-head attention over the keys where `key_mask` is True; with positions (conditional cross-attention)
  each head's query and key are its content projection followed by its position projection."""

  def __init__(self, config, conditional: bool = False):
    super().__init__()
    d = config.hidden_dim
    self.heads = config.num_heads
    names = ["query", "key", "value", "out"] + (["query_pos", "key_pos"] if conditional else [])
    for name in names:
      self.add_module(name, nn.Linear(d, d))
    self.dropout = nn.Dropout(config.dropout)

  def _split(self, x):
    return x.unflatten(-1, (self.heads, -1))  # (B, N, heads, d / heads)

  def forward(self, query, key, value, key_mask, query_pos=None, key_pos=None):
    q, k, v = self._split(self.query(query)), self._split(self.key(key)), self._split(self.value(value))
    if query_pos is not None:
      q = torch.cat([q, self._split(self.query_pos(query_pos))], -1)
      k = torch.cat([k, self._split(self.key_pos(key_pos))], -1)
    logits = torch.einsum("bnhc,bmhc->bhnm", q, k) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~key_mask[:, None, None, :], torch.finfo(logits.dtype).min)
    weights = self.dropout(logits.softmax(-1))
    return self.out(torch.einsum("bhnm,bmhc->bnhc", weights, v).flatten(-2))


class FeedForward(nn.Module):
  def __init__(self, config):
    super().__init__()
    self.dense_0 = nn.Linear(config.hidden_dim, config.ffn_dim)
    self.dense_1 = nn.Linear(config.ffn_dim, config.hidden_dim)
    self.dropout = nn.Dropout(config.dropout)

  def forward(self, x):
    return self.dense_1(self.dropout(F.relu(self.dense_0(x))))


class EncoderLayer(nn.Module):
  """Post-norm: x + x_pos attends to context (+ context_pos), then an FFN."""

  def __init__(self, config):
    super().__init__()
    self.attention = Attention(config)
    self.norm_0, self.norm_1 = _layer_norm(config.hidden_dim), _layer_norm(config.hidden_dim)
    self.ffn = FeedForward(config)
    self.dropout = nn.Dropout(config.dropout)

  def forward(self, x, x_pos, context, context_pos, context_mask):
    key = context if context_pos is None else context + context_pos
    x = self.norm_0(x + self.dropout(self.attention(x + x_pos, key, context, context_mask)))
    return self.norm_1(x + self.dropout(self.ffn(x)))


class Encoder(nn.Module):
  def __init__(self, config):
    super().__init__()
    self.cross_names = [f"cross_{i}" for i in range(config.num_cross_layers)]
    self.self_names = [f"self_{i}" for i in range(config.num_encoder_layers)]
    for name in self.cross_names + self.self_names:
      self.add_module(name, EncoderLayer(config))
    self.global_token = nn.Parameter(torch.randn(1, 1, config.hidden_dim))
    self.global_pos = nn.Parameter(torch.randn(1, 1, config.hidden_dim))

  def forward(self, frames, frame_pos, frame_mask, tokens, token_mask):
    """(global (B, d), frames (B, T, d))."""
    for name in self.cross_names:
      frames = getattr(self, name)(frames, frame_pos, tokens, None, token_mask)
    batch = frames.shape[0]
    x = torch.cat([self.global_token.expand(batch, -1, -1), frames], 1)
    pos = torch.cat([self.global_pos.expand(batch, -1, -1), frame_pos], 1)
    mask = torch.cat([frame_mask.new_ones(batch, 1), frame_mask], 1)
    for name in self.self_names:
      x = getattr(self, name)(x, pos, x, pos, mask)
    return x[:, 0], x[:, 1:]


class DecoderLayer(nn.Module):
  def __init__(self, config):
    super().__init__()
    self.self_attention = Attention(config)
    self.cross_attention = Attention(config, conditional=True)
    self.ffn = FeedForward(config)
    for i in range(3):
      self.add_module(f"norm_{i}", _layer_norm(config.hidden_dim))
    self.dropout = nn.Dropout(config.dropout)

  def forward(self, tgt, query_pos, query_sine, memory, memory_pos, memory_mask, first: bool):
    q = tgt + query_pos
    every_query = tgt.new_ones(tgt.shape[:2], dtype=torch.bool)
    tgt = self.norm_0(tgt + self.dropout(self.self_attention(q, q, tgt, every_query)))
    query, key = (tgt + query_pos, memory + memory_pos) if first else (tgt, memory)
    y = self.cross_attention(query, key, memory, memory_mask, query_pos=query_sine, key_pos=memory_pos)
    tgt = self.norm_1(tgt + self.dropout(y))
    return self.norm_2(tgt + self.dropout(self.ffn(tgt)))


class Decoder(nn.Module):
  """Anchors refined per layer: span = sigmoid(span_head(h) + logit(anchor)), the next anchors without gradient."""

  def __init__(self, config):
    super().__init__()
    d = config.hidden_dim
    self.num_layers = config.num_decoder_layers
    self.anchors = nn.Parameter(torch.randn(config.num_queries, 2))
    self.position_head = Mlp(d, d, d, 2)
    if self.num_layers > 1:  # Used from the second layer on.
      self.scale_head = Mlp(d, d, d, 2)
    self.width_head = Mlp(d, d, 1, 2)
    self.span_head = Mlp(d, d, 2, 3)
    self.class_head = nn.Linear(d, 2)
    self.norm = _layer_norm(d)
    for i in range(self.num_layers):
      self.add_module(f"layer_{i}", DecoderLayer(config))

  def forward(self, memory, memory_pos, memory_mask):
    batch, d = memory.shape[0], memory.shape[-1]
    reference = self.anchors.sigmoid().expand(batch, -1, -1)
    tgt = memory.new_zeros(batch, self.anchors.shape[0], d)
    all_logits, all_spans = [], []
    for i in range(self.num_layers):
      centre, width = reference[..., 0], reference[..., 1]
      query_pos = self.position_head(torch.cat([sine_embedding(centre, d // 2), sine_embedding(width, d // 2)], -1))
      query_sine = sine_embedding(centre, d)
      if i > 0:
        query_sine = query_sine * self.scale_head(tgt)
      query_sine = query_sine * (self.width_head(tgt).sigmoid() / width[..., None].clamp(min=1e-3))
      tgt = getattr(self, f"layer_{i}")(tgt, query_pos, query_sine, memory, memory_pos, memory_mask, i == 0)
      hidden = self.norm(tgt)
      spans = (self.span_head(hidden) + inverse_sigmoid(reference)).sigmoid()
      all_logits.append(self.class_head(hidden))
      all_spans.append(spans)
      reference = spans.detach()
    return torch.stack(all_logits), torch.stack(all_spans)


class QDDETR(nn.Module):
  """forward(audio (B, T, D + 2), audio_mask, text (B, L, D), text_mask, negative) -> dict like our MomentDETR's."""

  def __init__(self, config, audio_dim: int, text_dim: int):
    super().__init__()
    d = config.hidden_dim
    self.audio_projection = InputProjection(audio_dim, config)
    self.text_projection = InputProjection(text_dim, config)
    self.encoder = Encoder(config)
    self.saliency_frames, self.saliency_global = nn.Linear(d, d), nn.Linear(d, d)
    self.decoder = Decoder(config)

  def _saliency(self, frames, frame_pos, audio_mask, tokens, text_mask):
    global_token, memory = self.encoder(frames, frame_pos, audio_mask, tokens, text_mask)
    scores = (self.saliency_frames(memory) * self.saliency_global(global_token)[:, None]).sum(-1)
    return scores / math.sqrt(memory.shape[-1]), memory

  def forward(self, audio, audio_mask, text, text_mask, negative: bool = False):
    d = self.saliency_frames.out_features
    frames, tokens = self.audio_projection(audio), self.text_projection(text)
    count = audio_mask.sum(-1, keepdim=True).clamp(min=1).float()
    frame_pos = sine_embedding((torch.arange(audio.shape[1], dtype=torch.float32) + 0.5) / count, d)
    scores, memory = self._saliency(frames, frame_pos, audio_mask, tokens, text_mask)
    logits, spans = self.decoder(memory, frame_pos, audio_mask)
    outputs = {"logits": logits, "spans": spans, "saliency": scores}
    if negative:  # Recording i against query i + 1.
      shifted = (tokens.roll(-1, 0), text_mask.roll(-1, 0))
      outputs["saliency_negative"], _ = self._saliency(frames, frame_pos, audio_mask, *shifted)
    return outputs


def load_flax_params(model: QDDETR, params) -> None:
  """Copies a Flax parameter tree (nested mappings of arrays with our MomentDETR's names) into `model`: the same
  dotted names, Dense kernels transposed, LayerNorm scales as weights; both sides must hold the same names."""
  flat = {}

  def visit(tree, prefix):
    for name, value in tree.items():
      if hasattr(value, "items"):
        visit(value, prefix + (name,))
        continue
      value = np.asarray(value, np.float32)
      if name == "kernel":
        name, value = "weight", value.T
      flat[".".join(prefix + ({"scale": "weight"}.get(name, name),))] = value

  visit(params, ())
  state = model.state_dict()
  if set(flat) != set(state):
    raise ValueError(f"parameter names differ: {sorted(set(flat) ^ set(state))[:10]}")
  model.load_state_dict({k: torch.tensor(v).reshape(state[k].shape) for k, v in flat.items()})


def cxw_to_xx(spans):
  return torch.stack([spans[..., 0] - spans[..., 1] / 2, spans[..., 0] + spans[..., 1] / 2], -1)


def xx_to_cxw(windows):
  return torch.stack([(windows[..., 0] + windows[..., 1]) / 2, windows[..., 1] - windows[..., 0]], -1)


def generalized_iou(a, b):
  """gIoU of broadcast [start, end] spans."""
  intersection = (torch.minimum(a[..., 1], b[..., 1]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
  union = (a[..., 1] - a[..., 0]) + (b[..., 1] - b[..., 0]) - intersection
  hull = torch.maximum(a[..., 1], b[..., 1]) - torch.minimum(a[..., 0], b[..., 0])
  return intersection / union - (hull - union) / hull


@torch.no_grad()
def hungarian_match(logits, spans, windows, window_mask, loss_config) -> torch.Tensor:
  """(B, W) long: the query given to each valid window (scipy on the host), -1 elsewhere."""
  p_fg = logits.softmax(-1)[..., FOREGROUND]
  l1 = (spans[:, :, None] - xx_to_cxw(windows)[:, None]).abs().sum(-1)
  giou = generalized_iou(cxw_to_xx(spans)[:, :, None], windows[:, None])
  cost = loss_config.span_weight * l1 - loss_config.giou_weight * giou - loss_config.label_weight * p_fg[..., None]
  cost, mask = cost.numpy(), window_mask.numpy()
  matched = np.full(mask.shape, -1, np.int64)
  for b in range(len(cost)):
    columns = np.flatnonzero(mask[b])
    rows, picked = linear_sum_assignment(cost[b][:, columns])
    matched[b, columns[picked]] = rows
  return torch.from_numpy(matched)


def _masked_mean(values, mask):
  return torch.where(mask, values, 0).sum() / mask.sum().clamp(min=1)


def set_losses(logits, spans, windows, window_mask, loss_config) -> dict:
  """span, giou, label of one decoder layer."""
  matched = hungarian_match(logits, spans, windows, window_mask, loss_config)
  valid = window_mask & (matched >= 0)
  predicted = spans.gather(1, matched.clamp(min=0)[..., None].expand(-1, -1, 2))
  span = _masked_mean((predicted - xx_to_cxw(windows)).abs().mean(-1), valid)
  giou = _masked_mean(1 - generalized_iou(cxw_to_xx(predicted), windows), valid)
  queries = torch.arange(logits.shape[1])
  foreground = ((matched[:, None, :] == queries[None, :, None]) & valid[:, None, :]).any(-1)
  target = torch.where(foreground, FOREGROUND, 1 - FOREGROUND)
  nll = -logits.log_softmax(-1).gather(-1, target[..., None])[..., 0]
  label = (nll * torch.where(foreground, 1.0, loss_config.background_weight)).mean()
  return {"span": span, "giou": giou, "label": label}


def saliency_labels(first_window, audio_mask):
  """(B, T) bool: valid frames floor(start n) .. min(floor(end n), n) - 1 of the n valid frames."""
  count = audio_mask.sum(-1).float()
  start = (first_window[:, 0] * count).floor()
  end = (torch.minimum((first_window[:, 1] * count).floor(), count) - 1).clamp(min=0)
  start = torch.minimum(start, end)
  frames = torch.arange(audio_mask.shape[1], dtype=torch.float32)
  return (frames >= start[:, None]) & (frames <= end[:, None]) & audio_mask


def _draw(eligible, count, generator):
  keys = torch.where(eligible, torch.rand(eligible.shape, generator=generator), -torch.inf)
  values, indices = keys.topk(count, -1)
  return torch.where(values.isfinite(), indices, indices[:, :1])


def draw_pairs(labels, audio_mask, pairs: int, generator=None):
  """(inside, outside) (B, pairs) frame indices drawn without replacement (outside = inside when no frame is)."""
  inside = _draw(labels, pairs, generator)
  outside_eligible = audio_mask & ~labels
  outside = torch.where(outside_eligible.any(-1, keepdim=True), _draw(outside_eligible, pairs, generator), inside)
  return inside, outside


def saliency_losses(saliency, saliency_negative, labels, audio_mask, inside, outside, loss_config) -> dict:
  hinge = F.relu(loss_config.saliency_margin + saliency.gather(1, outside) - saliency.gather(1, inside))
  hinge = hinge.sum() / inside.numel() * 2
  scores = torch.cat([saliency, saliency_negative], 1)
  mask = torch.cat([audio_mask, audio_mask], 1)
  positive = torch.cat([labels, torch.zeros_like(labels)], 1)
  logits = torch.where(mask, scores, -1e3) / loss_config.rank_tau
  logits = logits - logits.max(-1, keepdim=True).values
  log_prob = logits - torch.log(logits.exp().sum(-1, keepdim=True) + 1e-6)
  mean_positive = torch.where(positive & mask, log_prob, 0).sum(-1) / (positive.sum(-1) + 1e-6)
  rank = -(mean_positive * positive.any(-1)).mean() / RANK_LEVELS
  negative = torch.where(audio_mask, F.softplus(saliency_negative), 0).sum(-1).mean()
  return {"saliency_hinge": hinge, "saliency_rank": rank, "saliency_negative": negative}


def moment_loss(outputs, batch, loss_config, generator=None, pairs=None):
  """(total, terms) of the model's outputs (forward with negative=True) on `batch` (torch tensors, bool masks);
  `pairs` = (inside, outside) hinge frames, else drawn with `generator`."""
  terms = {"span": 0.0, "giou": 0.0, "label": 0.0}
  for logits, spans in zip(outputs["logits"], outputs["spans"]):
    for name, value in set_losses(logits, spans, batch["windows"], batch["window_mask"], loss_config).items():
      terms[name] = terms[name] + value
  labels = saliency_labels(batch["windows"][:, 0], batch["audio_mask"])
  if pairs is None:
    pairs = draw_pairs(labels, batch["audio_mask"], loss_config.saliency_pairs, generator)
  terms.update(
    saliency_losses(outputs["saliency"], outputs["saliency_negative"], labels, batch["audio_mask"], *pairs, loss_config)
  )
  saliency = terms["saliency_hinge"] + terms["saliency_rank"] + terms["saliency_negative"]
  total = (
    loss_config.span_weight * terms["span"]
    + loss_config.giou_weight * terms["giou"]
    + loss_config.label_weight * terms["label"]
    + loss_config.saliency_weight * saliency
  )
  return total, terms


def make_optimizer(model, train_config):
  """AdamW over every parameter (weight decay on all, as ours and upstream)."""
  return torch.optim.AdamW(model.parameters(), lr=train_config.learning_rate, weight_decay=train_config.weight_decay)


def make_train_step(model, optimizer, config, generator=None):
  """step(batch, pairs=None) -> (total, terms): training-mode forward, loss, backward, global-norm clipping to
  `config.train.grad_clip_norm`, one AdamW update. `config` is `config.moments`."""

  def step(batch, pairs=None):
    model.train()
    optimizer.zero_grad(set_to_none=True)
    outputs = model(batch["audio"], batch["audio_mask"], batch["text"], batch["text_mask"], negative=True)
    total, terms = moment_loss(outputs, batch, config.loss, generator, pairs)
    total.backward()
    nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip_norm)
    optimizer.step()
    return total.detach(), {k: v.detach() for k, v in terms.items()}

  return step
