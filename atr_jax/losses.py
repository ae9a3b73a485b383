"""Contrastive losses over a batch of (audio, caption) pairs (SPEC section 5), single-device or sharded over a mesh.

Pair i of a batch is (audio_emb[i], text_emb[i]); ``clip_ids[i]`` names its audio clip, so pairs of one clip (several
captions of it in the batch) are known to the loss. Embeddings are L2-normalised here (idempotent on normalised
input) and compared by dot product, in float32 (float64 when given float64 under x64).

Every loss is written once, as a *share*: the contribution of a block of local rows (pairs) scored against all
pairs of the global batch, already divided by the global normaliser, so that the loss is the sum of the shares.
- unsharded: one share, the local block being the whole batch;
- sharded (``make_loss_fn`` with a mesh): inside ``jax.shard_map`` each device L2-normalises its rows, all-gathers
  both modalities and the clip ids over the batch axis (memory O(B_local x B_global)), computes its share and the
  shares are summed with ``psum``. Autodiff turns the all-gathers into reduce-scatters, so the value and the
  gradients equal the unsharded computation on the same global batch.
A new loss (triplets, NT-Xent, SigLIP) is one share function plus one ``_LOSSES`` entry.

Temperature: fixed (``temperature=`` given to ``make_loss_fn`` / ``get_loss``) or learnable, CLIP-style:
``loss_params = {'log_temperature': log(tau)}`` and tau = clip(exp(log_temperature), *TEMPERATURE_RANGE); outside
the range the clip holds tau at the bound and the gradient to log_temperature is zero (as CLIP's clamp). A learnable
temperature in ``loss_params`` takes precedence over a fixed one.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

TEMPERATURE_RANGE = (0.01, 1.0)


class _Rows(NamedTuple):
    """What a loss share sees: local pairs, all pairs of the global batch, and the global index of local row 0."""
    audio: jax.Array  # (b, D), L2-normalised
    text: jax.Array  # (b, D), L2-normalised
    clip_ids: jax.Array  # (b,)
    all_audio: jax.Array  # (B, D)
    all_text: jax.Array  # (B, D)
    all_clip_ids: jax.Array  # (B,)
    offset: jax.Array | int


class _LossDef(NamedTuple):
    share: Callable[[_Rows, dict[str, jax.Array], dict[str, Any]], jax.Array]  # (rows, loss_params, fixed) -> share
    fixed_keys: frozenset[str]  # hyper-parameters accepted as **fixed
    init_params: Callable[..., dict[str, jax.Array]]  # keyword arguments of init_loss_params -> loss_params


def infonce(audio_emb: jax.Array, text_emb: jax.Array, clip_ids: jax.Array, temperature: float) -> jax.Array:
    """Symmetric InfoNCE of one (global) batch with a fixed temperature; same-clip pairs leave the denominators."""
    return get_loss("infonce", temperature=temperature)(audio_emb, text_emb, clip_ids)


def get_loss(name: str, **fixed: Any) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """Unsharded loss ``fn(audio_emb, text_emb, clip_ids) -> scalar`` with fixed hyper-parameters."""
    loss_fn = make_loss_fn(name, None, **fixed)
    return lambda audio_emb, text_emb, clip_ids: loss_fn(audio_emb, text_emb, clip_ids, {})


def make_loss_fn(name: str, mesh: jax.sharding.Mesh | None, axis: str = "data",
                 **fixed: Any) -> Callable[[jax.Array, jax.Array, jax.Array, dict[str, jax.Array]], jax.Array]:
    """Loss ``fn(audio_emb, text_emb, clip_ids, loss_params) -> scalar`` on the global batch.

    With a mesh the batch (leading) axis of the three arrays is sharded over ``axis`` and the loss runs per device
    in ``jax.shard_map`` (see module docstring); ``loss_params`` (from ``init_loss_params``) are replicated.
    """
    loss = _loss_def(name)
    _check_fixed(name, loss, fixed)

    if mesh is None:
        def unsharded(audio_emb, text_emb, clip_ids, loss_params):
            _check_batch(name, audio_emb, text_emb, clip_ids, n_shards=1)
            audio, text = _l2_normalise(audio_emb), _l2_normalise(text_emb)
            return loss.share(_Rows(audio, text, clip_ids, audio, text, clip_ids, 0), loss_params, fixed)
        return unsharded

    if axis not in mesh.axis_names:
        raise ValueError(f"loss {name!r}: mesh has no axis {axis!r} (axes: {mesh.axis_names})")

    def per_device(audio_emb, text_emb, clip_ids, loss_params):
        audio, text = _l2_normalise(audio_emb), _l2_normalise(text_emb)
        gather = lambda x: jax.lax.all_gather(x, axis, tiled=True)  # noqa: E731
        offset = jax.lax.axis_index(axis) * audio.shape[0]
        rows = _Rows(audio, text, clip_ids, gather(audio), gather(text), gather(clip_ids), offset)
        return jax.lax.psum(loss.share(rows, loss_params, fixed), axis)

    sharded_loss = jax.shard_map(per_device, mesh=mesh, in_specs=(P(axis), P(axis), P(axis), P()), out_specs=P())

    def sharded(audio_emb, text_emb, clip_ids, loss_params):
        _check_batch(name, audio_emb, text_emb, clip_ids, n_shards=mesh.shape[axis])
        return sharded_loss(audio_emb, text_emb, clip_ids, loss_params)
    return sharded


def init_loss_params(name: str, *, learnable_temperature: bool, temperature: float) -> dict[str, jax.Array]:
    """Trainable parameters of a loss: ``{'log_temperature': log(temperature)}`` when learnable, else ``{}``."""
    return _loss_def(name).init_params(learnable_temperature=learnable_temperature, temperature=temperature)


# ---------------------------------------------------------------------------------------------------------- InfoNCE

def _infonce_share(rows: _Rows, loss_params: dict[str, jax.Array], fixed: dict[str, Any]) -> jax.Array:
    """0.5 (audio->text + text->audio) cross entropy of S / tau, mean over the global batch, same-clip pairs masked."""
    temperature = _temperature("infonce", loss_params, fixed)
    audio_to_text = _masked_cross_entropy(rows.audio, rows.all_text, rows.clip_ids, rows.all_clip_ids, rows.offset,
                                          temperature)
    text_to_audio = _masked_cross_entropy(rows.text, rows.all_audio, rows.clip_ids, rows.all_clip_ids, rows.offset,
                                          temperature)
    return 0.5 * (audio_to_text + text_to_audio) / rows.all_clip_ids.shape[0]


def _masked_cross_entropy(queries: jax.Array, candidates: jax.Array, query_clips: jax.Array,
                          candidate_clips: jax.Array, offset: jax.Array | int, temperature: jax.Array) -> jax.Array:
    """Sum over query rows of -log softmax(q . c / tau) at the query's own pair (candidate ``offset + row``).

    The other candidates of the query's clip are neither positives nor negatives: they leave the denominator.
    """
    logits = jnp.einsum("qd,cd->qc", queries, candidates, precision=jax.lax.Precision.HIGHEST) / temperature
    own = offset + jnp.arange(queries.shape[0])
    is_own = own[:, None] == jnp.arange(candidates.shape[0])[None, :]
    in_denominator = is_own | (query_clips[:, None] != candidate_clips[None, :])
    positive = jnp.take_along_axis(logits, own[:, None], axis=1)[:, 0]
    return jnp.sum(jax.nn.logsumexp(logits, axis=1, where=in_denominator) - positive)


def _init_temperature_params(*, learnable_temperature: bool, temperature: float) -> dict[str, jax.Array]:
    _check_temperature(temperature)
    if not learnable_temperature:
        return {}
    low, high = TEMPERATURE_RANGE
    if not low <= temperature <= high:
        raise ValueError(f"a learnable temperature must start inside {TEMPERATURE_RANGE}, got {temperature}")
    return {"log_temperature": jnp.asarray(math.log(temperature), jnp.float32)}


_LOSSES: dict[str, _LossDef] = {
    "infonce": _LossDef(_infonce_share, frozenset({"temperature"}), _init_temperature_params),
}


# ---------------------------------------------------------------------------------------------------------- helpers

def _loss_def(name: str) -> _LossDef:
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; available: {sorted(_LOSSES)}")
    return _LOSSES[name]


def _check_fixed(name: str, loss: _LossDef, fixed: dict[str, Any]) -> None:
    unknown = set(fixed) - loss.fixed_keys
    if unknown:
        raise ValueError(f"loss {name!r} got unknown hyper-parameters {sorted(unknown)}; it takes "
                         f"{sorted(loss.fixed_keys)}")
    if "temperature" in fixed:
        _check_temperature(fixed["temperature"])


def _check_temperature(temperature: Any) -> None:
    if not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")


def _temperature(name: str, loss_params: dict[str, jax.Array], fixed: dict[str, Any]) -> jax.Array | float:
    if "log_temperature" in loss_params:
        return jnp.clip(jnp.exp(loss_params["log_temperature"]), *TEMPERATURE_RANGE)
    if "temperature" in fixed:
        return fixed["temperature"]
    raise ValueError(f"loss {name!r} needs a temperature: pass temperature=... (fixed) or "
                     f"loss_params['log_temperature'] (learnable, from init_loss_params)")


def _check_batch(name: str, audio_emb: jax.Array, text_emb: jax.Array, clip_ids: jax.Array, n_shards: int) -> None:
    if audio_emb.ndim != 2 or audio_emb.shape != text_emb.shape:
        raise ValueError(f"loss {name!r}: audio_emb and text_emb must both be [B, D], got {audio_emb.shape} and "
                         f"{text_emb.shape}")
    if clip_ids.shape != audio_emb.shape[:1] or not jnp.issubdtype(clip_ids.dtype, jnp.integer):
        raise ValueError(f"loss {name!r}: clip_ids must be integers of shape ({audio_emb.shape[0]},), got "
                         f"{clip_ids.dtype}{clip_ids.shape}")
    if audio_emb.shape[0] % n_shards:
        raise ValueError(f"loss {name!r}: global batch {audio_emb.shape[0]} is not divisible by the {n_shards} "
                         f"devices of the batch axis")


def _l2_normalise(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))
