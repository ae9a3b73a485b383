"""Contrastive losses over a batch of (audio, caption) pairs (SPEC section 5), single-device or sharded over a mesh.

Pair i of a batch is (audio_emb[i], text_emb[i]); ``clip_ids[i]`` names its audio clip, so pairs of one clip (several
captions of it in the batch) are known to the loss. Embeddings are L2-normalised here (idempotent on normalised
input) and compared by dot product, in float32 (float64 when given float64 under x64). S[i, j] = audio i . caption j,
N = global batch, M[i, j] = same clip.

| name             | per query row q (a row of S, then of S^T), p = S[q, q]                    | loss          |
|------------------|---------------------------------------------------------------------------|---------------|
| triplet_max      | max over c not in q's clip of relu(margin + S[q, c] - p)                  | sum / N       |
| triplet_sum      | sum over c not in q's clip of relu(margin + S[q, c] - p)                  | sum / N       |
| triplet_weighted | n = max over c not in q's clip of S[q, c]; if n + margin > p:             | sum / N       |
|                  | relu(0.2p^2 - 0.7p + 0.5) + relu(0.9n^2 - 0.4n + 0.03), else 0            |               |
| ntxent           | -log softmax(S[q] / tau) at q (same-clip captions stay negatives)         | sum / (2N)    |
| infonce          | as ntxent, the other pairs of q's clip leave the denominator              | sum / (2N)    |
| infonce_multi    | -sum over c in q's clip of log softmax(S[q] / tau) at c (every pair stays | sum / (2 |P|) |
|                  | in the denominator: the DCASE 2025 baseline's multi-positive loss)        |               |
| siglip           | over all pairs: softplus(-z (t S + b)), z = +1 same clip, -1 otherwise    | sum / N^2     |
(siglip is the mean over all N^2 pairs as SPEC 5 writes it; the SigLIP paper divides the same sum by N.
infonce_multi is SPEC 11's -0.5 (mean_P log_softmax(C, axis 0) + mean_P log_softmax(C, axis 1)), C = S / tau, over
the set P of same-clip pairs (i, j) of the global batch, own pairs included.)

Every loss is written once, as a *share*: the contribution of a block of local rows (pairs) scored against all
pairs of the global batch, already divided by the global normaliser, so that the loss is the sum of the shares.
- unsharded: one share, the local block being the whole batch;
- sharded (``make_loss_fn`` with a mesh): inside ``jax.shard_map`` each device L2-normalises its rows, all-gathers
  both modalities and the clip ids over the batch axis (memory O(B_local x B_global)), computes its share and the
  shares are summed with ``psum``. Autodiff turns the all-gathers into reduce-scatters (in multi-process CPU jobs
  into all-reduces, see ``atr_jax.collectives``), so the value and the gradients equal the unsharded computation on
  the same global batch.
- chunked (``chunked=True``, siglip only): a pairwise loss needs no all-gather: the caption blocks travel round the
  ring of devices (``ppermute``), each device scoring its B_local audio rows against one B_local block at a time, so
  no device holds more than B_local x B_local scores (the loop body is rematerialised in the backward pass).

Weighted terms and ensemble distillation (SPEC 11): ``make_loss_fn(..., weight=w, distill_weight=d)`` returns
w x (the loss above) + d x distillation, where, with C = S / tau (the loss's temperature, fixed or learnable) and
C_t = the mean over teachers of the teachers' cosine similarities of the same pairs / tau, distillation =
0.5 (CE(C, softmax_rows(C_t)) + CE(C^T, softmax_rows(C_t^T))), each CE the mean over the N rows of
-sum_j target log softmax. The target is a constant (no gradient flows through it, into tau included). The loss
then takes the teachers' embeddings of the batch's pairs, ``teachers=(audio, text)``, each [B, K, D_t] (K
teachers, zero-padded to one width: padding changes no cosine), sharded and all-gathered like the student's.
Called with ``terms=True`` a distilling loss also returns its terms apart, unweighted, for logging:
``(total, {'contrastive': loss, 'distill': distillation})`` (no 'contrastive' when ``weight`` is 0), each summed over
the devices like the total, which is computed as without them (the same value and gradients, bit for bit); a loss
without distillation has one term, its total, and returns ``(total, {})``.

Hyper-parameters: fixed (``margin=``, ``temperature=``, ``scale=``, ``bias=`` given to ``make_loss_fn`` /
``get_loss``) or learnable (``init_loss_params(name, learnable=True, ...)``), in which case they live in
``loss_params`` and take precedence over fixed ones:
- ntxent / infonce: ``{'log_temperature'}``, tau = clip(exp(log_temperature), *TEMPERATURE_RANGE); outside the range
  the clip holds tau at the bound and the gradient is zero (as CLIP's clamp);
- infonce_multi: ``{'tau'}``, tau = |tau| unclipped (the DCASE 2025 baseline's parameterisation, initial 0.05);
- siglip: ``{'log_scale', 'bias'}``, t = exp(log_scale) (SigLIP initialises t = 10, b = -10).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from atr_jax import collectives
from atr_jax.models.dual_encoder import l2_normalize

TEMPERATURE_RANGE = (0.01, 1.0)
DEFAULT_MARGIN = 0.2
WEIGHTED_TRIPLET_POSITIVE = (0.2, -0.7, 0.5)  # coefficients (x^2, x, 1) of the positive term of triplet_weighted
WEIGHTED_TRIPLET_NEGATIVE = (0.9, -0.4, 0.03)  # ... and of its negative term

LossFn = Callable[..., Any]  # (audio_emb, text_emb, clip_ids, loss_params[, teachers], *, terms=False) -> scalar


class _Rows(NamedTuple):
  """What a loss share sees: local pairs, all pairs of the global batch, and the global index of local row 0."""

  audio: jax.Array  # (b, D), L2-normalised
  text: jax.Array  # (b, D), L2-normalised
  clip_ids: jax.Array  # (b,)
  all_audio: jax.Array  # (B, D)
  all_text: jax.Array  # (B, D)
  all_clip_ids: jax.Array  # (B,)
  offset: jax.Array | int
  teachers: tuple[jax.Array, jax.Array] | None = None  # (audio, text) (b, K, D_t), L2-normalised; distillation only
  all_teachers: tuple[jax.Array, jax.Array] | None = None  # (audio, text) (B, K, D_t)


class _Queries(NamedTuple):
  """One direction of a share: local query rows scored against every candidate of the global batch."""

  scores: jax.Array  # (b, B) cosine similarities
  positive: jax.Array  # (b,) score of each query's own pair
  is_own: jax.Array  # (b, B) the query's own pair
  same_clip: jax.Array  # (b, B) candidates of the query's clip (its own pair included)


class _LossDef(NamedTuple):
  share: Callable[[_Rows, dict, dict], jax.Array]  # (rows, loss_params, fixed) -> share of the loss
  fixed_keys: frozenset[str]  # hyper-parameters accepted as **fixed
  learnable_init: Callable[..., dict] | None  # initial hyper-parameters -> loss_params; None: nothing to learn
  pair_block: Callable[..., jax.Array] | None = None  # pairwise losses: (audio, text, ids_a, ids_t, params, fixed)


def get_loss(name: str, **fixed: Any) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
  """Unsharded loss ``fn(audio_emb, text_emb, clip_ids) -> scalar`` with fixed hyper-parameters."""
  loss_fn = make_loss_fn(name, None, **fixed)
  return lambda audio_emb, text_emb, clip_ids: loss_fn(audio_emb, text_emb, clip_ids, {})


def infonce(audio_emb: jax.Array, text_emb: jax.Array, clip_ids: jax.Array, temperature: float) -> jax.Array:
  """Symmetric InfoNCE of one (global) batch with a fixed temperature; same-clip pairs leave the denominators."""
  return get_loss("infonce", temperature=temperature)(audio_emb, text_emb, clip_ids)


def make_loss_fn(
  name: str,
  mesh: jax.sharding.Mesh | None,
  axis: str = "data",
  *,
  chunked: bool = False,
  weight: float = 1.0,
  distill_weight: float = 0.0,
  **fixed: Any,
) -> LossFn:
  """Loss ``fn(audio_emb, text_emb, clip_ids, loss_params, teachers=None, *, terms=False) -> scalar`` on the global
  batch: ``weight`` x the loss ``name``, plus ``distill_weight`` x distillation from ``teachers`` when
  ``distill_weight`` > 0 (then required; see module docstring). ``terms=True`` returns ``(scalar, {term: value})``,
  the distillation loss's terms apart (module docstring).

  With a mesh the batch (leading) axis of the arrays is sharded over ``axis`` and the loss runs per device
  in ``jax.shard_map`` (see module docstring); ``loss_params`` (from ``init_loss_params``) are replicated.
  ``chunked`` selects the ring variant of a pairwise loss (siglip); it changes memory, not the value.
  """
  loss = _loss_def(name)
  _check_fixed(name, loss, fixed)
  if chunked and loss.pair_block is None:
    raise ValueError(
      f"loss {name!r} has no chunked variant (only pairwise losses do: "
      f"{sorted(n for n, d in _LOSSES.items() if d.pair_block is not None)})"
    )
  distilling = distill_weight > 0
  if distilling and "temperature" not in loss.fixed_keys:
    raise ValueError(
      f"distillation divides the similarities by the student's temperature, and loss {name!r} has none: use one of "
      f"{sorted(n for n, d in _LOSSES.items() if 'temperature' in d.fixed_keys)}"
    )
  if distill_weight < 0 or weight < 0 or not (weight or distilling):
    raise ValueError(
      f"loss {name!r}: weight={weight} and distill_weight={distill_weight} must be >= 0, one of them positive"
    )

  def share(rows: _Rows, loss_params: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The rows' share of the total and of each of its terms (unweighted; {} without distillation)."""
    terms = {}
    if weight:
      terms["contrastive"] = loss.share(rows, loss_params, fixed)
    if distilling:
      terms["distill"] = _distillation_share(rows, _temperature(name, loss_params, fixed))
    total = weight * terms["contrastive"] if weight else 0.0
    if distilling:
      total = total + distill_weight * terms["distill"]
    return total, terms if distilling else {}

  def check(audio_emb, text_emb, clip_ids, teachers, n_shards):
    _check_batch(name, audio_emb, text_emb, clip_ids, n_shards)
    if distilling != (teachers is not None):
      raise ValueError(
        f"loss {name!r}: teachers must be given exactly when distill_weight > 0 "
        f"(distill_weight={distill_weight}, teachers {'given' if teachers is not None else 'missing'})"
      )
    if distilling:
      _check_teachers(name, audio_emb.shape[0], teachers)

  def normalize(audio_emb, text_emb, teachers):
    teachers = None if teachers is None else tuple(l2_normalize(t) for t in teachers)
    return l2_normalize(audio_emb), l2_normalize(text_emb), teachers

  if mesh is None:

    def unsharded(audio_emb, text_emb, clip_ids, loss_params, teachers=None, *, terms=False):
      check(audio_emb, text_emb, clip_ids, teachers, n_shards=1)
      audio, text, teachers = normalize(audio_emb, text_emb, teachers)
      total, by_term = share(_Rows(audio, text, clip_ids, audio, text, clip_ids, 0, teachers, teachers), loss_params)
      return (total, by_term) if terms else total

    return unsharded

  if axis not in mesh.axis_names:
    raise ValueError(f"loss {name!r}: mesh has no axis {axis!r} (axes: {mesh.axis_names})")
  n_devices = mesh.shape[axis]

  def gathered_share(audio, text, clip_ids, loss_params, teachers):
    gather = lambda x: collectives.all_gather(x, axis)  # noqa: E731
    offset = jax.lax.axis_index(axis) * audio.shape[0]
    all_teachers = None if teachers is None else tuple(gather(t) for t in teachers)
    rows = _Rows(audio, text, clip_ids, gather(audio), gather(text), gather(clip_ids), offset, teachers, all_teachers)
    return share(rows, loss_params)

  def ring_share(audio, text, clip_ids, loss_params, teachers):
    ring = [(d, (d + 1) % n_devices) for d in range(n_devices)]

    @jax.checkpoint
    def visit(_, carry):
      text_block, text_ids, total = carry
      total = total + loss.pair_block(audio, text_block, clip_ids, text_ids, loss_params, fixed)
      return jax.lax.ppermute(text_block, axis, ring), jax.lax.ppermute(text_ids, axis, ring), total

    total = jax.lax.pcast(jnp.zeros((), audio.dtype), axis, to="varying")  # a per-device sum, as the carry
    _, _, total = jax.lax.fori_loop(0, n_devices, visit, (text, clip_ids, total))
    return weight * total / (n_devices * audio.shape[0]) ** 2, {}  # No distillation (siglip has no temperature).

  per_device_share = ring_share if chunked else gathered_share

  def per_device(audio_emb, text_emb, clip_ids, loss_params, teachers):
    audio, text, teachers = normalize(audio_emb, text_emb, teachers)
    return jax.lax.psum(per_device_share(audio, text, clip_ids, loss_params, teachers), axis)

  sharded_loss = jax.shard_map(per_device, mesh=mesh, in_specs=(P(axis), P(axis), P(axis), P(), P(axis)), out_specs=P())

  def sharded(audio_emb, text_emb, clip_ids, loss_params, teachers=None, *, terms=False):
    check(audio_emb, text_emb, clip_ids, teachers, n_shards=n_devices)
    total, by_term = sharded_loss(audio_emb, text_emb, clip_ids, loss_params, teachers)
    return (total, by_term) if terms else total

  return sharded


def init_loss_params(name: str, *, learnable: bool, **initial: Any) -> dict[str, jax.Array]:
  """Trainable parameters of a loss, ``{}`` unless ``learnable``; ``initial`` holds the starting hyper-parameters
  (``temperature`` for ntxent/infonce, default 0.07, and for infonce_multi, default 0.05; ``scale``, ``bias`` for
  siglip, default 10 and -10)."""
  loss = _loss_def(name)
  _check_fixed(name, loss, initial)
  if not learnable:
    return {}
  if loss.learnable_init is None:
    raise ValueError(f"loss {name!r} has no learnable parameters")
  return loss.learnable_init(**initial)


def make_loss_fn_from_config(
  loss_config, mesh: jax.sharding.Mesh | None, axis: str = "data", *, distill_weight: float = 0.0
) -> LossFn:
  """``make_loss_fn`` for ``config.loss``: its name, weight, the hyper-parameters that loss takes, and
  siglip_chunked; ``distill_weight`` (config.distill.weight when distilling) adds the distillation term."""
  chunked = loss_config.name == "siglip" and bool(loss_config.siglip_chunked)
  return make_loss_fn(
    loss_config.name,
    mesh,
    axis,
    chunked=chunked,
    weight=loss_config.weight,
    distill_weight=distill_weight,
    **_config_hyper_parameters(loss_config),
  )


def init_loss_params_from_config(loss_config) -> dict[str, jax.Array]:
  """``init_loss_params`` for ``config.loss`` (learnable per ``learnable_temperature`` / ``siglip_learnable``)."""
  learnable_key = _LEARNABLE_CONFIG_KEY.get(loss_config.name)
  learnable = learnable_key is not None and bool(loss_config[learnable_key])
  return init_loss_params(loss_config.name, learnable=learnable, **_config_hyper_parameters(loss_config))


# -------------------------------------------------------------------------------------------------------- shares


def _directions(rows: _Rows) -> tuple[_Queries, _Queries]:
  """Audio rows against all captions (rows of S) and caption rows against all clips (rows of S^T)."""
  own = rows.offset + jnp.arange(rows.clip_ids.shape[0])
  is_own = own[:, None] == jnp.arange(rows.all_clip_ids.shape[0])[None, :]
  same_clip = rows.clip_ids[:, None] == rows.all_clip_ids[None, :]

  def queries(local, candidates):
    scores = _scores(local, candidates)
    return _Queries(scores, jnp.take_along_axis(scores, own[:, None], axis=1)[:, 0], is_own, same_clip)

  return queries(rows.audio, rows.all_text), queries(rows.text, rows.all_audio)


def _hinge_costs(q: _Queries, margin: float) -> jax.Array:
  """relu(margin + S[q, c] - p) for candidates of other clips, 0 for the query's own clip."""
  return jnp.where(q.same_clip, 0.0, jax.nn.relu(margin + q.scores - q.positive[:, None]))


def _triplet_max_share(rows: _Rows, loss_params: dict, fixed: dict) -> jax.Array:
  margin = fixed.get("margin", DEFAULT_MARGIN)
  total = sum(jnp.sum(jnp.max(_hinge_costs(q, margin), axis=1)) for q in _directions(rows))
  return total / rows.all_clip_ids.shape[0]


def _triplet_sum_share(rows: _Rows, loss_params: dict, fixed: dict) -> jax.Array:
  margin = fixed.get("margin", DEFAULT_MARGIN)
  return sum(jnp.sum(_hinge_costs(q, margin)) for q in _directions(rows)) / rows.all_clip_ids.shape[0]


def _triplet_weighted_share(rows: _Rows, loss_params: dict, fixed: dict) -> jax.Array:
  margin = fixed.get("margin", DEFAULT_MARGIN)

  def quadratic(coefficients, x):
    a, b, c = coefficients
    return jax.nn.relu(a * x * x + b * x + c)

  total = 0.0
  for q in _directions(rows):
    hardest = jnp.max(jnp.where(q.same_clip, -jnp.inf, q.scores), axis=1)
    has_hard = hardest + margin > q.positive  # False when every candidate is of the query's clip (-inf)
    hardest = jnp.where(has_hard, hardest, 0.0)  # keeps -inf out of the gradient
    row_loss = quadratic(WEIGHTED_TRIPLET_POSITIVE, q.positive) + quadratic(WEIGHTED_TRIPLET_NEGATIVE, hardest)
    total = total + jnp.sum(jnp.where(has_hard, row_loss, 0.0))
  return total / rows.all_clip_ids.shape[0]


def _cross_entropy_share(mask_same_clip: bool) -> Callable[[_Rows, dict, dict], jax.Array]:
  """0.5 (audio->text + text->audio) cross entropy of S / tau at the own pair, mean over the global batch; with
  ``mask_same_clip`` the other pairs of the query's clip leave the denominator (infonce), else they stay (ntxent)."""
  name = "infonce" if mask_same_clip else "ntxent"

  def share(rows: _Rows, loss_params: dict, fixed: dict) -> jax.Array:
    temperature = _temperature(name, loss_params, fixed)
    total = 0.0
    for q in _directions(rows):
      in_denominator = (q.is_own | ~q.same_clip) if mask_same_clip else None
      log_normaliser = jax.nn.logsumexp(q.scores / temperature, axis=1, where=in_denominator)
      total = total + jnp.sum(log_normaliser - q.positive / temperature)
    return 0.5 * total / rows.all_clip_ids.shape[0]

  return share


def _multi_positive_share(rows: _Rows, loss_params: dict, fixed: dict) -> jax.Array:
  """-0.5 sum over both directions and the local rows' same-clip pairs of log softmax(S / tau), over |P|."""
  temperature = _temperature("infonce_multi", loss_params, fixed)
  total = 0.0
  for q in _directions(rows):
    logits = q.scores / temperature
    log_probability = logits - jax.nn.logsumexp(logits, axis=1, keepdims=True)
    total = total + jnp.sum(jnp.where(q.same_clip, log_probability, 0.0))
  return -0.5 * total / _same_clip_pair_count(rows.all_clip_ids)


def _distillation_share(rows: _Rows, temperature: jax.Array | float) -> jax.Array:
  """0.5 sum over both directions and the local rows of CE(C row, softmax(C_t row)), over N (module docstring)."""
  total = 0.0
  for local, candidates, teacher_local, teacher_candidates in (
    (rows.audio, rows.all_text, rows.teachers[0], rows.all_teachers[1]),
    (rows.text, rows.all_audio, rows.teachers[1], rows.all_teachers[0]),
  ):
    teacher_scores = (
      jnp.einsum("qkd,ckd->qc", teacher_local, teacher_candidates, precision=jax.lax.Precision.HIGHEST)
      / teacher_local.shape[1]
    )  # The mean over the K teachers of their cosine similarities.
    target = jax.lax.stop_gradient(jax.nn.softmax(teacher_scores / temperature, axis=1))
    total = total - jnp.sum(target * jax.nn.log_softmax(_scores(local, candidates) / temperature, axis=1))
  return 0.5 * total / rows.all_clip_ids.shape[0]


def _same_clip_pair_count(clip_ids: jax.Array) -> jax.Array:
  """|P| = number of (i, j) with clip_ids[i] == clip_ids[j] (sum of squared clip counts), without a B x B array."""
  ordered = jnp.sort(clip_ids)
  count_of_own_clip = jnp.searchsorted(ordered, ordered, side="right") - jnp.searchsorted(ordered, ordered)
  return jnp.sum(count_of_own_clip)


def _siglip_pair_block(audio, text, audio_ids, text_ids, loss_params: dict, fixed: dict) -> jax.Array:
  """Sum over the pairs of an (audio block) x (caption block) of softplus(-z (t S + b))."""
  scale, bias = _siglip_scale_bias(loss_params, fixed)
  logits = scale * _scores(audio, text) + bias
  sign = jnp.where(audio_ids[:, None] == text_ids[None, :], 1.0, -1.0)
  return jnp.sum(jax.nn.softplus(-sign * logits))


def _siglip_share(rows: _Rows, loss_params: dict, fixed: dict) -> jax.Array:
  block = _siglip_pair_block(rows.audio, rows.all_text, rows.clip_ids, rows.all_clip_ids, loss_params, fixed)
  return block / rows.all_clip_ids.shape[0] ** 2


def _init_temperature_params(*, temperature: float = 0.07) -> dict[str, jax.Array]:
  low, high = TEMPERATURE_RANGE
  if not low <= temperature <= high:
    raise ValueError(f"a learnable temperature must start inside {TEMPERATURE_RANGE}, got {temperature}")
  return {"log_temperature": jnp.asarray(math.log(temperature), jnp.float32)}


def _init_abs_temperature_params(*, temperature: float = 0.05) -> dict[str, jax.Array]:
  return {"tau": jnp.asarray(temperature, jnp.float32)}


def _init_siglip_params(*, scale: float = 10.0, bias: float = -10.0) -> dict[str, jax.Array]:
  return {"log_scale": jnp.asarray(math.log(scale), jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}


_TRIPLET_KEYS = frozenset({"margin"})
_LOSSES: dict[str, _LossDef] = {
  "triplet_max": _LossDef(_triplet_max_share, _TRIPLET_KEYS, None),
  "triplet_sum": _LossDef(_triplet_sum_share, _TRIPLET_KEYS, None),
  "triplet_weighted": _LossDef(_triplet_weighted_share, _TRIPLET_KEYS, None),
  "ntxent": _LossDef(_cross_entropy_share(mask_same_clip=False), frozenset({"temperature"}), _init_temperature_params),
  "infonce": _LossDef(_cross_entropy_share(mask_same_clip=True), frozenset({"temperature"}), _init_temperature_params),
  "infonce_multi": _LossDef(_multi_positive_share, frozenset({"temperature"}), _init_abs_temperature_params),
  "siglip": _LossDef(_siglip_share, frozenset({"scale", "bias"}), _init_siglip_params, _siglip_pair_block),
}
# config.loss keys: hyper-parameter -> key, (loss, hyper-parameter) -> key where a loss has a key of its own, and
# loss -> the key that makes its hyper-parameters learnable.
_HYPER_PARAMETER_CONFIG_KEY = {
  "margin": "margin",
  "temperature": "temperature",
  "scale": "siglip_scale",
  "bias": "siglip_bias",
}
_OWN_HYPER_PARAMETER_CONFIG_KEY = {("infonce_multi", "temperature"): "multi_positive_temperature"}
_LEARNABLE_CONFIG_KEY = {
  "ntxent": "learnable_temperature",
  "infonce": "learnable_temperature",
  "infonce_multi": "learnable_temperature",
  "siglip": "siglip_learnable",
}


# ------------------------------------------------------------------------------------------------------- helpers


def _loss_def(name: str) -> _LossDef:
  if name not in _LOSSES:
    raise ValueError(f"unknown loss {name!r}; available: {sorted(_LOSSES)}")
  return _LOSSES[name]


def _config_hyper_parameters(loss_config) -> dict[str, Any]:
  """The hyper-parameters of loss ``loss_config.name`` that ``loss_config`` sets (``config.loss.<key>``)."""
  name = loss_config.name
  config_keys = {
    key: _OWN_HYPER_PARAMETER_CONFIG_KEY.get((name, key), _HYPER_PARAMETER_CONFIG_KEY[key])
    for key in sorted(_loss_def(name).fixed_keys)
  }
  return {
    key: loss_config[config_key] for key, config_key in config_keys.items() if loss_config.get(config_key) is not None
  }


def _check_fixed(name: str, loss: _LossDef, fixed: dict[str, Any]) -> None:
  unknown = set(fixed) - loss.fixed_keys
  if unknown:
    raise ValueError(
      f"loss {name!r} got unknown hyper-parameters {sorted(unknown)}; it takes {sorted(loss.fixed_keys)}"
    )
  for key, value in fixed.items():
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
      raise ValueError(f"loss {name!r}: {key} must be a number, got {value!r}")
    if key in ("temperature", "scale") and not value > 0:
      raise ValueError(f"loss {name!r}: {key} must be a positive number, got {value!r}")
    if key == "margin" and not value >= 0:
      raise ValueError(f"loss {name!r}: margin must be >= 0, got {value!r}")


def _temperature(name: str, loss_params: dict, fixed: dict) -> jax.Array | float:
  if "log_temperature" in loss_params:
    return jnp.clip(jnp.exp(loss_params["log_temperature"]), *TEMPERATURE_RANGE)
  if "tau" in loss_params:
    return jnp.abs(loss_params["tau"])
  if "temperature" in fixed:
    return fixed["temperature"]
  raise ValueError(
    f"loss {name!r} needs a temperature: pass temperature=... (fixed) or "
    "loss_params from init_loss_params(learnable=True)"
  )


def learnable_values(loss_params: dict) -> dict[str, jax.Array]:
  """The values the loss uses for its learnable hyper-parameters (for logging): ``temperature`` (clipped or |tau|
  as in the loss) or ``siglip_scale`` and ``siglip_bias``; ``{}`` when nothing is learnt."""
  if "log_temperature" in loss_params or "tau" in loss_params:
    return {"temperature": _temperature("", loss_params, {})}
  if "log_scale" in loss_params:
    scale, bias = _siglip_scale_bias(loss_params, {})
    return {"siglip_scale": scale, "siglip_bias": bias}
  return {}


def _siglip_scale_bias(loss_params: dict, fixed: dict) -> tuple[jax.Array | float, jax.Array | float]:
  if "log_scale" in loss_params:
    return jnp.exp(loss_params["log_scale"]), loss_params["bias"]
  if "scale" in fixed and "bias" in fixed:
    return fixed["scale"], fixed["bias"]
  raise ValueError(
    "loss 'siglip' needs scale and bias: pass scale=..., bias=... (fixed) or "
    "loss_params {'log_scale', 'bias'} (learnable, from init_loss_params)"
  )


def _check_batch(name: str, audio_emb: jax.Array, text_emb: jax.Array, clip_ids: jax.Array, n_shards: int) -> None:
  if audio_emb.ndim != 2 or audio_emb.shape != text_emb.shape:
    raise ValueError(
      f"loss {name!r}: audio_emb and text_emb must both be [B, D], got {audio_emb.shape} and {text_emb.shape}"
    )
  if clip_ids.shape != audio_emb.shape[:1] or not jnp.issubdtype(clip_ids.dtype, jnp.integer):
    raise ValueError(
      f"loss {name!r}: clip_ids must be integers of shape ({audio_emb.shape[0]},), got {clip_ids.dtype}{clip_ids.shape}"
    )
  if audio_emb.shape[0] % n_shards:
    raise ValueError(
      f"loss {name!r}: global batch {audio_emb.shape[0]} is not divisible by the {n_shards} devices of the batch axis"
    )


def _check_teachers(name: str, batch: int, teachers) -> None:
  if (
    len(teachers) != 2
    or any(t.ndim != 3 or t.shape[0] != batch for t in teachers)
    or teachers[0].shape != teachers[1].shape
  ):
    raise ValueError(
      f"loss {name!r}: teachers must be (audio, text) arrays of one shape [{batch}, K, D], got "
      f"{[getattr(t, 'shape', t) for t in teachers]}"
    )


def _scores(queries: jax.Array, candidates: jax.Array) -> jax.Array:
  return jnp.einsum("qd,cd->qc", queries, candidates, precision=jax.lax.Precision.HIGHEST)
