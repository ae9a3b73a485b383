"""Tests of the PaSST-S tower (atr_jax.models.passt) and its front end (data_pipelines.passt_features): parity with
hear21passt's PyTorch model (random weights, via tests/torch_passt.py) on 5, 10 and 25 s inputs, the front end
against an independent float64 version of SPEC 11's formulas, masking (no dependence on batch-mates), structured
patchout, bf16 and remat, and the released-weights mapping and its errors."""

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections
import numpy as np
import pytest

from atr_jax.models import passt
from data_pipelines import passt_features
from data_pipelines.features import AudioError

SMALL = dict(embed_dim=64, depth=1, num_heads=4, mlp_dim=128)  # PaSST's layout at a width the CPU tests afford


def _reference_log_mel(waveform: np.ndarray, fmin: float = 0.0, fmax: float = 15000.0) -> np.ndarray:
  """SPEC 11's front end written out in float64: full 1024-sample frames with the 800-tap symmetric Hann window in
  their middle, and the Kaldi triangles built bank by bank."""
  x = waveform.astype(np.float64)
  padded = np.pad(x[1:] - 0.97 * x[:-1], 512, mode="reflect")
  window = np.zeros(1024)
  window[112:912] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(800) / 799)
  frames = np.stack([padded[start : start + 1024] for start in range(0, len(padded) - 1024 + 1, 320)])
  power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2
  mel = lambda hz: 1127.0 * np.log(1.0 + hz / 700.0)
  step = (mel(fmax) - mel(fmin)) / 129
  fft_mel = mel(np.arange(512) * 32000 / 1024)
  banks = np.zeros((128, 513))
  for m in range(128):
    left, centre, right = (mel(fmin) + k * step for k in (m, m + 1, m + 2))
    banks[m, :512] = np.clip(
      np.minimum((fft_mel - left) / (centre - left), (right - fft_mel) / (right - centre)), 0, None
    )
  return (np.log(power @ banks.T + 1e-5) + 4.5) / 5


def _waveform(rng: np.random.Generator, num_samples: int) -> np.ndarray:
  """Noise plus a chirp, with a loudness ramp: energy in every mel band, and a quiet start."""
  t = np.arange(num_samples) / 32000
  chirp = np.sin(2 * np.pi * (200 + 3000 * t) * t)
  return ((0.05 * rng.standard_normal(num_samples) + 0.3 * chirp) * np.linspace(0.01, 1, num_samples)).astype(
    np.float32
  )


def test_front_end_matches_float64_formulas():
  rng = np.random.default_rng(0)
  for num_samples in (5 * 32000, 5 * 32000 + 123, 400):  # 400: shorter than the padding, reflected repeatedly
    waveform = _waveform(rng, num_samples)
    ours = passt_features.log_mel(waveform)
    expected = _reference_log_mel(waveform)
    assert ours.dtype == np.float32 and ours.shape == expected.shape == (passt_features.num_frames(num_samples), 128)
    assert np.abs(ours - expected).max() < 0.01
  assert passt_features.num_frames(10 * 32000) == passt.SEGMENT_FRAMES


def test_front_end_batch_equals_single_clips_and_draws_training_bands():
  rng = np.random.default_rng(1)
  clips = [_waveform(rng, 3 * 32000 + 77), _waveform(rng, 2 * 32000)]
  waveforms = np.zeros((2, len(clips[0])), np.float32)
  waveforms[1, : len(clips[1])] = clips[1]
  waveforms[0] = clips[0]
  lengths = np.array([len(clip) for clip in clips])
  log_mel, frame_mask = jax.jit(passt_features.log_mel_batch)(waveforms, lengths)
  for row, clip in enumerate(clips):
    frames = passt_features.num_frames(len(clip))
    assert frame_mask[row].sum() == frames and frame_mask[row, :frames].all()
    np.testing.assert_allclose(log_mel[row, :frames], passt_features.log_mel(clip), atol=1e-3)

  fmin, fmax = passt_features.random_band(jax.random.key(0), 4096)
  assert 0 <= fmin.min() and fmin.max() <= 9 and np.unique(fmin).size == 10 and np.all(fmin == np.round(fmin))
  assert 14001 <= fmax.min() and fmax.max() <= 16000 and np.all(fmax == np.round(fmax))
  band = (np.array([7.0, 0.0], np.float32), np.array([15900.0, 14100.0], np.float32))
  augmented, _ = jax.jit(passt_features.log_mel_batch)(waveforms, lengths, band)
  for row, clip in enumerate(clips):
    expected = _reference_log_mel(clip, float(band[0][row]), float(band[1][row]))
    assert np.abs(augmented[row, : len(expected)] - expected).max() < 0.01
    assert np.abs(augmented[row, : len(expected)] - log_mel[row, : len(expected)]).max() > 0.1


def test_front_end_refuses_what_features_refuses():
  with pytest.raises(AudioError) as error:
    passt_features.log_mel(np.zeros(319, np.float32))
  assert error.value.reason == "too_short"
  with pytest.raises(AudioError, match="mono"):
    passt_features.log_mel(np.zeros((2, 32000), np.float32))


def _batch(rng: np.random.Generator, lengths: list[int], frames: int) -> tuple[np.ndarray, np.ndarray]:
  """Features (B, frames, 128) holding clips of `lengths` frames, padded with huge values that masking must hide."""
  x = np.full((len(lengths), frames, 128), 1e4, np.float32)
  mask = np.zeros((len(lengths), frames), bool)
  for row, length in enumerate(lengths):
    x[row, :length] = rng.normal(0.0, 1.0, (length, 128))
    mask[row, :length] = True
  return x, mask


def _init(tower: passt.Passt) -> dict:
  """The tower's variables (jitted: an eager init dispatches op by op)."""
  return jax.jit(lambda: tower.init(jax.random.key(0), jnp.zeros((1, 1000, 128)), jnp.ones((1, 1000), bool), False))()


@pytest.fixture(scope="module")
def small_variables() -> dict:
  return _init(passt.Passt(**SMALL))


def test_embedding_does_not_depend_on_batch_mates_or_padding(small_variables):
  tower, variables = passt.Passt(**SMALL), small_variables
  embed = jax.jit(lambda x, m: tower.apply(variables, x, m, train=False))
  rng = np.random.default_rng(2)
  x, mask = _batch(rng, [1300, 700, 3000, 2005], 3000)  # 2005: the third segment has no full patch column
  together = np.asarray(embed(x, mask))
  assert together.shape == (4, 64) and together.dtype == np.float32 and np.isfinite(together).all()
  for row, length in enumerate([1300, 700, 3000, 2005]):
    alone = np.asarray(embed(x[row : row + 1, :length], mask[row : row + 1, :length]))[0]
    np.testing.assert_allclose(together[row], alone, rtol=1e-5, atol=1e-6)
  first_two = np.asarray(embed(x[3:, :2000], mask[3:, :2000]))[0]
  np.testing.assert_allclose(together[3], first_two, rtol=1e-5, atol=1e-6)


def test_structured_patchout_shapes_and_kept_columns():
  tokens = jnp.arange(3 * 8 * 62, dtype=jnp.float32).reshape(3, 8, 62, 1)
  column_valid = jnp.arange(62)[None, :] < jnp.array([[62], [20], [10]])
  patchout = jax.jit(passt.structured_patchout, static_argnums=(3, 4))
  kept, kept_valid = patchout(jax.random.key(0), tokens, column_valid, 15, 2)
  assert kept.shape == (3, 6, 47, 1) and kept_valid.shape == (3, 47)
  assert kept_valid.sum(axis=1).tolist() == [47, 5, 1]  # 15 valid columns dropped, at most all but one
  time_index = np.asarray(kept[:, 0, :, 0] % 62).astype(int)
  for row, valid in enumerate(np.asarray(kept_valid)):
    assert np.all(np.diff(time_index[row, valid]) > 0)  # kept columns stay in time order
    assert np.all(time_index[row, valid] < [62, 20, 10][row])
  rows = np.asarray(kept[:, :, 0, 0] // 62).astype(int)
  assert all(len(set(row)) == 6 and np.all(np.diff(row) > 0) for row in rows)


def test_patchout_in_training_only(small_variables):
  tower, variables = passt.Passt(**SMALL), small_variables
  x, mask = _batch(np.random.default_rng(3), [1000, 600], 1000)
  is_block = lambda module, method: isinstance(module, passt.Block) and method == "__call__"

  def run(module, train, rng=None):
    rngs = {"augment": rng} if rng is not None else None
    apply = jax.jit(lambda x, m: module.apply(variables, x, m, train=train, rngs=rngs, capture_intermediates=is_block))
    out, state = apply(x, mask)
    return np.asarray(out), state["intermediates"]["blocks"]["0"]["__call__"][0].shape

  evaluated, eval_shape = run(tower, False)
  assert eval_shape == (2, 2 + 8 * 62, 64)
  trained, train_shape = run(tower, True, jax.random.key(1))
  assert train_shape == (2, 2 + 6 * 47, 64)
  assert np.abs(trained - evaluated).max() > 1e-3
  np.testing.assert_array_equal(trained, run(tower, True, jax.random.key(1))[0])
  with pytest.raises(Exception, match="augment"):
    run(tower, True)
  no_patchout = passt.Passt(**SMALL, patchout_time=0, patchout_freq=0)
  np.testing.assert_allclose(run(no_patchout, True)[0], evaluated, rtol=1e-6)


def test_bf16_compute_keeps_float32_parameters_and_output(small_variables):
  x, mask = _batch(np.random.default_rng(4), [1000, 400], 1000)
  variables = small_variables
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  full = jax.jit(lambda x, m: passt.Passt(**SMALL).apply(variables, x, m, train=False))(x, mask)
  half = jax.jit(lambda x, m: passt.Passt(**SMALL, dtype=jnp.bfloat16).apply(variables, x, m, train=False))(x, mask)
  assert half.dtype == jnp.float32
  assert np.abs(half - full).max() < 0.05 * np.abs(full).max()


def test_remat_gives_the_same_gradients(small_variables):
  x, mask = _batch(np.random.default_rng(5), [320, 200], 320)
  variables = small_variables

  def gradients(module_class):
    loss = lambda params: jnp.sum(
      module_class(**SMALL).apply({"params": params}, x, mask, True, rngs={"augment": jax.random.key(5)}) ** 2
    )
    return jax.jit(jax.grad(loss))(variables["params"])

  plain = gradients(passt.Passt)
  block_by_block = gradients(functools.partial(passt.Passt, remat=True))
  whole = gradients(nn.remat(passt.Passt, static_argnums=(3,)))
  assert max(np.abs(leaf).max() for leaf in jax.tree.leaves(plain)) > 0
  for rematerialised in (block_by_block, whole):
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematerialised)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)


def test_block_remat_recomputes_the_blocks():
  """remat=True wraps every block in a checkpoint: the backward pass's program holds the blocks' forward twice."""
  x, mask = _batch(np.random.default_rng(6), [64], 64)
  variables = _init(passt.Passt(**SMALL))

  def backward_program(remat):
    loss = lambda p: jnp.sum(passt.Passt(**SMALL, remat=remat).apply({"params": p}, x, mask, False) ** 2)
    return str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))

  assert "remat" in backward_program(True) and "remat" not in backward_program(False)


def test_fields_from_config():
  keys = dict(embed_dim=96, depth=3, num_heads=4, mlp_dim=200, patchout_time=7, patchout_freq=1)
  tower = passt.Passt(**passt.fields_from_config(ml_collections.ConfigDict({"passt": keys})))
  assert {key: getattr(tower, key) for key in keys} == keys


def test_waveform_input_runs_the_front_end_clip_by_clip(small_variables):
  """Waveforms (B, L) + sample mask go through the PaSST front end inside the tower: in eval mode each clip's
  embedding equals the tower's on `passt_features.log_mel` of the clip alone (fixed band); in training the band is
  drawn from the 'augment' stream, per clip; a padding row (no sample) leaves the others unchanged."""
  tower, variables = passt.Passt(**SMALL, patchout_time=0, patchout_freq=0), small_variables
  rng = np.random.default_rng(7)
  lengths = [32000, 17000, 0]
  waveforms = np.zeros((3, 32000), np.float32)
  for row, length in enumerate(lengths):
    waveforms[row, :length] = rng.uniform(-0.5, 0.5, length)
  sample_mask = np.arange(32000)[None, :] < np.array(lengths)[:, None]
  embed = jax.jit(lambda w, m, train, rng: tower.apply(variables, w, m, train, rngs={"augment": rng}), static_argnums=2)
  on_waveforms = np.asarray(embed(waveforms, sample_mask, False, jax.random.key(0)))
  for row, length in enumerate(lengths[:2]):
    features = passt_features.log_mel(waveforms[row, :length])[None]
    on_features = tower.apply(variables, features, np.ones(features.shape[:2], bool), False)
    np.testing.assert_allclose(on_waveforms[row], np.asarray(on_features)[0], rtol=2e-3, atol=2e-4)
  assert np.isfinite(on_waveforms).all()
  trained = np.asarray(embed(waveforms, sample_mask, True, jax.random.key(1)))
  assert np.abs(trained[:2] - on_waveforms[:2]).max() > 1e-4  # the random band changed the features
  np.testing.assert_array_equal(trained, np.asarray(embed(waveforms, sample_mask, True, jax.random.key(1))))


def _converted(tmp_path, depth: int):
  """(hear21passt reference, Flax tower, its variables loaded from the reference's saved state_dict)."""
  pytest.importorskip("torch")
  pytest.importorskip("hear21passt")
  import torch

  from tests import torch_passt

  reference = torch_passt.passt_s(depth)
  path = str(tmp_path / "passt-s-f128-p16-s16-ap.468.pt")
  torch.save({name: tensor.float() for name, tensor in reference.state_dict().items()}, path)
  tower = passt.Passt(depth=depth)
  variables = passt.load(path, jax.eval_shape(lambda: _init(tower)))
  return reference, tower, variables


def _relative_error(ours: np.ndarray, expected: np.ndarray) -> float:
  return float(np.abs(ours - expected).max() / np.abs(expected).max())


def test_parity_with_hear21passt_on_5_10_and_25_s(tmp_path):
  reference, tower, variables = _converted(tmp_path, depth=2)
  from tests import torch_passt

  lengths = [500, 1000, 2500]  # 5 s, 10 s, 25 s (three segments, the last one half full)
  x, mask = _batch(np.random.default_rng(6), lengths, 2500)
  ours = np.asarray(jax.jit(lambda v, x, m: tower.apply(v, x, m, train=False))(variables, x, mask))
  for row, length in enumerate(lengths):
    error = _relative_error(ours[row], torch_passt.embed(reference, x[row, :length]))
    print(f"PaSST-S depth 2, {length} frames: max relative error {error:.2e}")
    assert error < 1e-4


@pytest.mark.slow
def test_full_depth_parity_and_parameter_count(tmp_path):
  reference, tower, variables = _converted(tmp_path, depth=12)
  from tests import torch_passt

  torch_count = sum(parameter.numel() for parameter in reference.parameters())
  heads = sum(p.numel() for name, p in reference.named_parameters() if name.startswith(passt.SKIPPED_PREFIXES))
  count = sum(leaf.size for leaf in jax.tree.leaves(variables))
  print(f"PaSST-S parameters: {torch_count:,} in hear21passt, {count:,} in the tower (without the AudioSet heads)")
  assert torch_count == 86_122_270 and count == torch_count - heads
  lengths = [1000, 500]  # 10 s, and 5 s padded to 10 s
  x, mask = _batch(np.random.default_rng(7), lengths, 1000)
  ours = np.asarray(jax.jit(lambda v, x, m: tower.apply(v, x, m, train=False))(variables, x, mask))
  for row, length in enumerate(lengths):
    error = _relative_error(ours[row], torch_passt.embed(reference, x[row, :length]))
    print(f"PaSST-S full depth, {length} frames: max relative error {error:.2e}")
    assert error < 1e-4


def test_mapping_errors_name_the_torch_keys(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("hear21passt")
  from tests import torch_passt

  state_dict = {name: tensor.float().numpy() for name, tensor in torch_passt.passt_s(depth=2).state_dict().items()}
  del state_dict["blocks.1.mlp.fc2.bias"]
  state_dict["time_new_pos_embed"] = np.zeros((1, 768, 1, 50), np.float32)
  state_dict["blocks.2.attn.qkv.weight"] = np.zeros((2304, 768), np.float32)
  state_dict["pos_embed"] = np.zeros((1, 498, 768), np.float32)
  state_dict["blocks.0.mlp.fc1.weight"] = np.zeros((3072, 700), np.float32)
  expected = jax.eval_shape(lambda: _init(passt.Passt(depth=2)))
  with pytest.raises(ValueError) as error:
    passt.state_dict_to_variables(state_dict, expected, "passt.pt")
  message = str(error.value)
  assert "passt.pt" in message
  assert "missing keys: ['blocks.1.mlp.fc2.bias (model: params/blocks/1/mlp/fc2/bias)']" in message
  assert "blocks.2.attn.qkv.weight (model: params/blocks/2/attn/qkv/kernel)" in message
  assert "pos_embed (model: params/pos_embed)" in message
  # Shapes as the file holds them: the positional embedding channels-first, a linear layer's weight (out, in).
  assert "blocks.0.mlp.fc1.weight (model: params/blocks/0/mlp/fc1/kernel): expected (3072, 768), got (3072, 700)" in (
    message
  )
  assert "time_new_pos_embed (model: params/time_new_pos_embed): expected (1, 768, 1, 62), got (1, 768, 1, 50)" in (
    message
  )
  assert "head" not in message  # the classification heads are skipped, not unexpected


def test_long_clips_average_their_first_1_2_or_all_10_s_segments(small_variables):
  """SPEC 11b's long-clip rule (the DCASE 2025 baseline): a clip is the mean of its 10 s segments' embeddings, over
  the first 1 (up to 10 s), 2 (up to 20 s) or all 3 (up to 30 s) segments of a batch padded to 30 s, each segment
  embedded alone (as a row of its own, padded and masked: test_embedding_does_not_depend_on_batch_mates_or_padding);
  the batch's padding never counts. Lengths away from the rule's edges: a clip at most 15 frames (0.15 s) past 10 or
  20 s is one or two segments here (no full 16-frame patch column in the next), one more in the baseline."""
  tower, variables = passt.Passt(**SMALL), small_variables
  embed = jax.jit(lambda x, m: tower.apply(variables, x, m, train=False))
  lengths = [950, 1000, 1400, 2000, 2600, 3000]  # frames at 100 / s
  counts = [1 if length <= 1000 else 2 if length <= 2000 else 3 for length in lengths]
  x, mask = _batch(np.random.default_rng(11), lengths, 3000)
  segments = x.reshape(len(lengths) * 3, 1000, 128), mask.reshape(len(lengths) * 3, 1000)
  alone = np.asarray(embed(*segments)).reshape(len(lengths), 3, -1)
  expected = np.stack([alone[row, :count].mean(axis=0) for row, count in enumerate(counts)])
  np.testing.assert_allclose(np.asarray(embed(x, mask)), expected, rtol=1e-5, atol=1e-6)


def test_the_recipe_masks_neither_frequencies_nor_time_only_its_mel_band_is_random(monkeypatch):
  """SPEC 11b: the baseline's front end has freqm=0 and timem=0. The recipe's tower (configs/clotho_passt_roberta.py,
  narrowed) in training differs from evaluation by the random mel band and structured patchout alone: with patchout
  off and the band pinned to the fixed one, a training forward pass gives evaluation's embedding."""
  from atr_jax.models import registry
  from configs import clotho_passt_roberta

  config = clotho_passt_roberta.get_config().model.audio
  config.passt.update(**SMALL, patchout_time=0, patchout_freq=0)
  tower = registry.audio_tower(config).build(config)
  fixed = lambda rng, batch: (jnp.full((batch,), passt_features.FMIN), jnp.full((batch,), passt_features.FMAX))  # noqa: E731
  monkeypatch.setattr(passt_features, "random_band", fixed)
  rng = np.random.default_rng(12)
  lengths = [3 * 32000, 2 * 32000]
  waveforms = np.zeros((2, 3 * 32000), np.float32)
  for row, length in enumerate(lengths):
    waveforms[row, :length] = rng.uniform(-0.5, 0.5, length)
  sample_mask = np.arange(3 * 32000)[None, :] < np.array(lengths)[:, None]
  variables = jax.jit(lambda: tower.init(jax.random.key(0), waveforms[:1], sample_mask[:1], False))()
  apply = jax.jit(
    lambda train: tower.apply(variables, waveforms, sample_mask, train, rngs={"augment": jax.random.key(3)}),
    static_argnums=0,
  )
  evaluated, trained = apply(False), apply(True)
  np.testing.assert_allclose(np.asarray(trained), np.asarray(evaluated), rtol=1e-4, atol=1e-5)
