"""Training, inference and evaluation of the moment model (SPEC 12) on precomputed features.

Interface (plain numpy, from `atr_jax.moments.features` or anything alike): a split is `frames` {vid: (T, D + 2)
float32, frame t covering [t hop, (t + 1) hop) seconds}, `tokens` {qid: (L, D) float32} and `queries` (objects with
`qid`, `vid`, `duration` and `windows`: ((start, end) seconds, ...)). `pack` turns them into `MomentArrays`.

- Spans are fractions of the frames' span (T x hop seconds); predictions are converted back to seconds, clamped to
  the frames (of their segment) and to [0, duration].
- Training: data-parallel on the 1-D 'data' mesh (`atr_jax.sharding`): parameters and AdamW state replicated, each
  global batch sharded over 'data', one jitted step; AdamW (`moments.train.learning_rate`, `weight_decay` on every
  parameter, as upstream), gradients clipped to global norm `grad_clip_norm`. A query with more than `max_windows`
  windows trains on its first window and a fresh random draw of the others each epoch. Recordings longer than
  `max_frames` train on their first `max_frames` frames (windows clipped to it; a query left with none is dropped).
- Inference: each query gets `num_queries` windows ranked by the last decoder layer's foreground probability. A
  recording longer than `max_frames` is cut into segments of `max_frames` frames at half-overlap (the last one ending
  with the recording), each segment's last two feature columns rewritten as the frames' start and end fractions of
  the segment; the segments' windows are pooled, a window whose IoU with a higher-scored kept one reaches
  `segment_merge_iou` is dropped, and the best `num_queries` are kept.
- `train_and_evaluate` validates every `eval_every_epochs` (metrics of `atr_jax.moments.metrics`), keeps the latest and
  the best checkpoint by validation R1@0.7, and writes each loss term to TensorBoard (train/<term>).
"""

import dataclasses
import functools

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from flax.training import train_state

from atr_jax import checkpointing, sharding
from atr_jax.moments import losses, metrics
from atr_jax.moments.matching import FOREGROUND
from atr_jax.moments.model import MomentDETR

SELECTION_METRIC = "R1@0.7"


@dataclasses.dataclass
class MomentArrays:
  """One row per query: audio (N, T, D + 2), audio_mask (N, T), text (N, L, D), text_mask (N, L), windows (N, W, 2)
  as fractions of span_s, window_mask (N, W); span_s (N,) seconds the valid frames cover, duration (N,) seconds."""

  qids: list
  vids: list
  audio: np.ndarray
  audio_mask: np.ndarray
  text: np.ndarray
  text_mask: np.ndarray
  windows: np.ndarray
  window_mask: np.ndarray
  span_s: np.ndarray
  duration: np.ndarray

  def __len__(self) -> int:
    return len(self.qids)

  def take(self, rows) -> "MomentArrays":
    return MomentArrays(
      *(
        [getattr(self, f.name)[i] for i in rows] if f.name in ("qids", "vids") else getattr(self, f.name)[rows]
        for f in dataclasses.fields(self)
      )
    )


def _pad(arrays: list[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
  out = np.zeros((len(arrays), length, arrays[0].shape[-1]), np.float32)
  mask = np.zeros((len(arrays), length), bool)
  for i, a in enumerate(arrays):
    out[i, : len(a)], mask[i, : len(a)] = a[:length], True
  return out, mask


def pack(frames: dict, tokens: dict, queries, hop_s: float, max_frames: int, max_tokens: int) -> MomentArrays:
  """The split's queries as arrays, recordings cut to their first `max_frames` frames (training's rule)."""
  rows, dropped = [], 0
  for q in queries:
    audio = np.asarray(frames[q.vid], np.float32)[:max_frames]
    span_s = len(audio) * hop_s
    windows = [(s, min(e, span_s)) for s, e in q.windows if s < span_s]
    if not windows:
      dropped += 1
      continue
    rows.append((q, audio, np.asarray(tokens[q.qid], np.float32)[:max_tokens], windows, span_s))
  if dropped:
    logging.info("%d queries dropped: their windows start after the first %d frames", dropped, max_frames)
  if not rows:
    raise ValueError("no query has a window inside its recording's frames")
  audio, audio_mask = _pad([r[1] for r in rows], max(len(r[1]) for r in rows))
  text, text_mask = _pad([r[2] for r in rows], max(len(r[2]) for r in rows))
  num_windows = max(len(r[3]) for r in rows)
  windows = np.zeros((len(rows), num_windows, 2), np.float32)
  window_mask = np.zeros((len(rows), num_windows), bool)
  for i, r in enumerate(rows):
    windows[i, : len(r[3])] = np.asarray(r[3], np.float32) / r[4]
    window_mask[i, : len(r[3])] = True
  return MomentArrays(
    qids=[r[0].qid for r in rows],
    vids=[r[0].vid for r in rows],
    audio=audio,
    audio_mask=audio_mask,
    text=text,
    text_mask=text_mask,
    windows=windows,
    window_mask=window_mask,
    span_s=np.array([r[4] for r in rows], np.float32),
    duration=np.array([r[0].duration for r in rows], np.float32),
  )


def sample_windows(windows, window_mask, max_windows: int, rng: np.random.Generator):
  """(windows, mask) with at most `max_windows` per row: the first window kept, the others a random draw."""
  out = np.zeros((len(windows), max_windows, 2), np.float32)
  mask = np.zeros((len(windows), max_windows), bool)
  for i in range(len(windows)):
    valid = np.flatnonzero(window_mask[i])
    chosen = np.concatenate([valid[:1], rng.permutation(valid[1:])])[:max_windows]
    out[i, : len(chosen)], mask[i, : len(chosen)] = windows[i, chosen], True
  return out, mask


def segment_starts(num_frames: int, max_frames: int) -> list[int]:
  """First frame of each inference segment: one segment when it fits, else half-overlapping ones, the last ending
  with the recording."""
  if num_frames <= max_frames:
    return [0]
  starts = list(range(0, num_frames - max_frames, max_frames // 2))
  return starts + [num_frames - max_frames]


def merge_windows(windows: np.ndarray, merge_iou: float, keep: int) -> np.ndarray:
  """(K, 3) [start, end, score] pooled from segments -> the `keep` best by score, dropping each window whose IoU with
  a higher-scored kept window reaches `merge_iou`."""
  kept = []
  for w in windows[np.argsort(-windows[:, 2], kind="stable")]:
    if all(metrics._iou(w[None, :2], k[None, :2])[0, 0] < merge_iou for k in kept):
      kept.append(w)
    if len(kept) == keep:
      break
  return np.array(kept)


def create_state(config: ml_collections.ConfigDict, feature_dims: tuple[int, int], mesh, rng):
  """A replicated flax TrainState of the model (AdamW after global-norm clipping) for audio width D + 2 and text
  width D (`feature_dims`), and its shardings."""
  model = MomentDETR(config.model)
  train_config = config.train
  tx = optax.chain(
    optax.clip_by_global_norm(train_config.grad_clip_norm),
    optax.adamw(train_config.learning_rate, weight_decay=train_config.weight_decay),
  )
  audio_dim, text_dim = feature_dims
  dummy = (np.zeros((1, 4, audio_dim), np.float32), np.ones((1, 4), bool))
  dummy += (np.zeros((1, 2, text_dim), np.float32), np.ones((1, 2), bool))

  def init(rng):
    params = model.init(rng, *dummy, train=False)["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  replicated = jax.tree.map(lambda _: sharding.replicated(mesh), jax.eval_shape(init, rng))
  return jax.jit(init, out_shardings=replicated)(rng), replicated


def make_train_step(config: ml_collections.ConfigDict):
  """step(state, batch, rng) -> (state, {"loss", <terms>}): one AdamW update on a global batch."""

  def step(state, batch, rng):
    dropout_rng, loss_rng = jax.random.split(rng)

    def loss_fn(params):
      outputs = state.apply_fn(
        {"params": params},
        batch["audio"],
        batch["audio_mask"],
        batch["text"],
        batch["text_mask"],
        train=True,
        negative=True,
        rngs={"dropout": dropout_rng},
      )
      return losses.moment_loss(outputs, batch, loss_rng, config.loss)

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), {"loss": loss, **terms}

  return jax.jit(step, donate_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model_config: ml_collections.FrozenConfigDict, params, audio, audio_mask, text, text_mask):
  """Last decoder layer's spans (B, Q, 2) and foreground probabilities (B, Q)."""
  outputs = MomentDETR(model_config).apply({"params": params}, audio, audio_mask, text, text_mask, train=False)
  scores = jax.nn.softmax(outputs["logits"][-1], -1)[..., FOREGROUND]
  return outputs["spans"][-1], scores


def _batches(num_rows: int, batch_size: int):
  for first in range(0, num_rows, batch_size):
    yield np.arange(first, min(first + batch_size, num_rows))


def predict(params, config: ml_collections.ConfigDict, frames: dict, tokens: dict, queries, hop_s: float, mesh):
  """Lighthouse-format predictions of the model `config` (`config.moments`), one per query: {"qid", "vid",
  "pred_relevant_windows": [[start, end, score], ...]} in seconds, best first (long recordings segmented and merged,
  see the module docstring). Single-process."""
  train_config, model_config = config.train, ml_collections.FrozenConfigDict(config.model)
  params = jax.device_put(params, sharding.replicated(mesh))
  max_frames = train_config.max_frames
  pieces = []  # (query index, audio piece, offset seconds)
  for index, q in enumerate(queries):
    audio = np.asarray(frames[q.vid], np.float32)
    for start in segment_starts(len(audio), max_frames):
      piece = audio[start : start + max_frames].copy()
      if len(piece) < len(audio):  # Positions relative to the segment.
        piece[:, -2] = np.arange(len(piece)) / len(piece)
        piece[:, -1] = (np.arange(len(piece)) + 1) / len(piece)
      pieces.append((index, piece, start * hop_s))
  batch_size = train_config.global_batch_size
  spans, scores = [], []
  for rows in _batches(len(pieces), batch_size):
    padded = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])  # A fixed shape: one compile.
    audio, audio_mask = _pad([pieces[i][1] for i in padded], max_frames)
    text, text_mask = _pad(
      [np.asarray(tokens[queries[pieces[i][0]].qid])[: train_config.max_tokens] for i in padded],
      train_config.max_tokens,
    )
    batch = sharding.global_batch(dict(audio=audio, audio_mask=audio_mask, text=text, text_mask=text_mask), mesh)
    span, score = _forward(model_config, params, batch["audio"], batch["audio_mask"], batch["text"], batch["text_mask"])
    spans.append(sharding.to_host(span)[: len(rows)])
    scores.append(sharding.to_host(score)[: len(rows)])
  spans, scores = np.concatenate(spans), np.concatenate(scores)
  per_query = [[] for _ in queries]
  for (index, piece, offset), span, score in zip(pieces, spans, scores):
    piece_s = len(piece) * hop_s
    start = offset + np.clip(span[:, 0] - span[:, 1] / 2, 0, 1) * piece_s  # Inside its segment.
    end = offset + np.clip(span[:, 0] + span[:, 1] / 2, 0, 1) * piece_s
    per_query[index].append(np.stack([start, end, score], -1))
  predictions = []
  for q, found in zip(queries, per_query):
    windows = np.concatenate(found).astype(np.float64)
    windows[:, :2] = np.clip(windows[:, :2], 0, q.duration)
    windows = merge_windows(windows, train_config.segment_merge_iou, config.model.num_queries)
    predictions.append({"qid": q.qid, "vid": q.vid, "pred_relevant_windows": windows.tolist()})
  return predictions


def evaluate(params, config, frames, tokens, queries, hop_s, mesh) -> tuple[dict, list]:
  """(metrics, predictions) of `queries` (see `metrics.evaluate`)."""
  predictions = predict(params, config, frames, tokens, queries, hop_s, mesh)
  truth = [{"qid": q.qid, "duration": q.duration, "relevant_windows": [list(w) for w in q.windows]} for q in queries]
  return metrics.evaluate(predictions, truth), predictions


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, train_split, val_split, hop_s: float) -> dict:
  """Trains `config.moments` on `train_split` (an object with `frames`, `tokens`, `queries`), validating on
  `val_split`; returns the best validation metrics. The best state is the checkpoint kept by R1@0.7."""
  moments_config, train_config = config.moments, config.moments.train
  mesh = sharding.create_mesh()
  local_batch = sharding.check_global_batch(train_config.global_batch_size, "moments.train.global_batch_size")
  arrays = pack(
    train_split.frames, train_split.tokens, train_split.queries, hop_s, train_config.max_frames, train_config.max_tokens
  )
  steps_per_epoch = len(arrays) // train_config.global_batch_size
  if steps_per_epoch == 0:
    raise ValueError(
      f"moments.train.global_batch_size={train_config.global_batch_size} exceeds the {len(arrays)} training queries"
    )
  rng = jax.random.key(config.seed)
  init_rng, rng = jax.random.split(rng)
  state, shardings = create_state(moments_config, (arrays.audio.shape[-1], arrays.text.shape[-1]), mesh, init_rng)
  if moments_config.init_from:
    state = state.replace(params=initial_params(moments_config.init_from, state.params, shardings.params))
  step_fn = make_train_step(moments_config)
  manager = checkpointing.create_manager(workdir, SELECTION_METRIC)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  order_rng = np.random.default_rng(config.seed)
  best = None
  for epoch in range(1, train_config.num_epochs + 1):
    order = order_rng.permutation(len(arrays))
    for i in range(steps_per_epoch):
      rows = order[i * train_config.global_batch_size : (i + 1) * train_config.global_batch_size]
      rows = rows[jax.process_index() * local_batch : (jax.process_index() + 1) * local_batch]
      part = arrays.take(rows)
      windows, window_mask = sample_windows(part.windows, part.window_mask, train_config.max_windows, order_rng)
      batch = sharding.global_batch(
        dict(
          audio=part.audio,
          audio_mask=part.audio_mask,
          text=part.text,
          text_mask=part.text_mask,
          windows=windows,
          window_mask=window_mask,
        ),
        mesh,
      )
      state, scalars = step_fn(state, batch, jax.random.fold_in(rng, int(state.step)))
      step = int(state.step)
      if step % train_config.log_every_steps == 0 or step == 1:
        writer.write_scalars(step, {f"train/{k}": float(v) for k, v in scalars.items()})
    if epoch % train_config.eval_every_epochs == 0 or epoch == train_config.num_epochs:
      val_metrics, _ = evaluate(
        state.params, config.moments, val_split.frames, val_split.tokens, val_split.queries, hop_s, mesh
      )
      writer.write_scalars(int(state.step), {f"val/{k}": v for k, v in val_metrics.items()})
      logging.info("epoch %d: %s", epoch, val_metrics)
      checkpointing.save(manager, int(state.step), state, val_metrics)
      if best is None or val_metrics[SELECTION_METRIC] > best[SELECTION_METRIC]:
        best = val_metrics
  writer.flush()
  return best


def initial_params(init_from: str, params, params_shardings):
  """The best parameters of the moment workdir `init_from` (`moments.init_from`), placed like `params`; another
  model shape is an error naming the first differing parameter."""
  loaded = restore_best_params(init_from)
  expected = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
  found = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(loaded)}
  for name in sorted(set(expected) | set(found)):
    if expected.get(name) != found.get(name):
      raise ValueError(
        f"moments.init_from={init_from}: parameter {name} is {found.get(name)} there, {expected.get(name)} in "
        "this config's moments.model (the model configs must match)"
      )
  return jax.device_put(loaded, params_shardings)


def restore_best_params(workdir: str) -> dict:
  """The parameters of the best checkpoint (by validation R1@0.7) on the first local device."""
  manager = checkpointing.create_manager(workdir, SELECTION_METRIC)
  step = manager.best_step()
  if step is None:
    raise checkpointing.CheckpointError(f"{workdir} holds no moment-model checkpoint")
  return checkpointing.restore_on_one_device(manager, step)["params"]
