"""Ensemble distillation (SPEC 11): the loss against a float64 numpy reference (values, gradients, the known minimum
of self-distillation), sharded against unsharded on 8 fake devices, its terms reported apart (each loss alone, the
total and the training step unchanged bit for bit), teacher folders looked up by identity (any data order, missing
clips named), and a tiny student distilled from the tiny trained run, its terms in TensorBoard."""

import dataclasses
import functools
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from test_losses import make_data_mesh, numerical_gradient, random_batch, reference_infonce
from test_retrieve import set_in_config
from test_train_step import _batch
from tiny_run import tensorboard_scalars, tiny_config

from atr_jax import distillation, model_identity, sharding, train
from atr_jax.losses import init_loss_params, make_loss_fn, make_loss_fn_from_config
from configs.base import get_base_config


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(x):
  x = x - x.max(axis=1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def reference_distillation(audio, text, teacher_audio, teacher_text, tau, target_tau=None):
  """SPEC 11 in float64: C = S / tau, C_t = mean over teachers k of cosine(teacher_audio[:, k], teacher_text[:, k]) /
  tau; 0.5 (CE(C, softmax_rows(C_t)) + CE(C^T, softmax_rows(C_t^T))), CE = mean over rows of -sum p log q.
  `target_tau` (default tau) divides C_t alone: the loss's target is a constant, so tau's gradient is taken with it
  held."""
  c = _unit(audio) @ _unit(text).T / tau
  sims = [_unit(teacher_audio[:, k]) @ _unit(teacher_text[:, k]).T for k in range(teacher_audio.shape[1])]
  c_t = np.mean(sims, axis=0) / (tau if target_tau is None else target_tau)
  total = 0.0
  for logits, teacher in ((c, c_t), (c.T, c_t.T)):
    target = np.exp(_log_softmax(teacher))
    total += np.mean(-np.sum(target * _log_softmax(logits), axis=1))
  return 0.5 * total


def _teachers(rng, batch, widths=(5, 7)):
  """Two teachers of different widths, zero-padded to the widest (as `Teachers.lookup` hands them over)."""
  audio, text = np.zeros((2, batch, len(widths), max(widths)))
  for k, width in enumerate(widths):
    audio[:, k, :width] = rng.normal(size=(batch, width))
    text[:, k, :width] = 2.0 * audio[:, k, :width] + rng.normal(size=(batch, width))
  return audio, text


def test_self_distillation_is_the_entropy_of_the_teacher_rows():
  rng = np.random.default_rng(0)
  audio, text, clip_ids = random_batch(rng, batch=12, dim=8, n_clips=5)
  tau = 0.1
  itself = tuple(jnp.asarray(np.repeat(x[:, None], 2, axis=1), jnp.float32) for x in (3.0 * audio, text))  # K = 2
  loss = make_loss_fn("infonce", None, weight=0.0, distill_weight=1.0, temperature=tau)
  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
    jnp.asarray(audio, jnp.float32), jnp.asarray(text, jnp.float32), jnp.asarray(clip_ids), {}, itself
  )
  c = _unit(audio) @ _unit(text).T / tau
  entropy = 0.5 * sum(np.mean(-np.sum(np.exp(_log_softmax(m)) * _log_softmax(m), axis=1)) for m in (c, c.T))
  np.testing.assert_allclose(value, entropy, rtol=1e-5)  # CE(p, p) = H(p): the minimum over student embeddings.
  for grad in grads:
    np.testing.assert_allclose(grad, 0.0, atol=1e-6)
  assert entropy > 0.1


def test_weighted_loss_matches_float64_reference_value_and_gradients():
  rng = np.random.default_rng(1)
  audio, text, clip_ids = random_batch(rng, batch=10, dim=6, n_clips=4)
  teachers = _teachers(rng, 10)
  params = init_loss_params("infonce", learnable=True, temperature=0.2)
  loss = make_loss_fn("infonce", None, weight=0.7, distill_weight=1.5)
  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 3)))(
    jnp.asarray(audio, jnp.float32),
    jnp.asarray(text, jnp.float32),
    jnp.asarray(clip_ids),
    params,
    tuple(jnp.asarray(t, jnp.float32) for t in teachers),
  )

  def reference(a, t, tau=0.2):
    return 0.7 * reference_infonce(a, t, clip_ids, tau) + 1.5 * reference_distillation(a, t, *teachers, tau, 0.2)

  assert reference_distillation(audio, text, *teachers, 0.2) > 1e-2
  np.testing.assert_allclose(value, reference(audio, text), rtol=1e-5)
  np.testing.assert_allclose(grads[0], numerical_gradient(lambda a: reference(a, text), audio), atol=3e-5)
  np.testing.assert_allclose(grads[1], numerical_gradient(lambda t: reference(audio, t), text), atol=3e-5)
  log_tau = np.array(np.log(0.2))
  expected = numerical_gradient(lambda lt: reference(audio, text, np.exp(lt)), log_tau)
  np.testing.assert_allclose(grads[2]["log_temperature"], expected, rtol=1e-4)


def test_sharded_equals_unsharded_and_holds_local_rows_only():
  mesh = make_data_mesh()
  rng = np.random.default_rng(2)
  audio, text, clip_ids = random_batch(rng, batch=64, dim=12, n_clips=20)
  audio, text, clip_ids = audio.astype(np.float32), text.astype(np.float32), clip_ids.astype(np.int32)
  teachers = tuple(t.astype(np.float32) for t in _teachers(rng, 64))
  params = init_loss_params("infonce_multi", learnable=True)
  unsharded_fn = make_loss_fn("infonce_multi", None, distill_weight=2.0)
  sharded_fn = make_loss_fn("infonce_multi", mesh, distill_weight=2.0)
  data = NamedSharding(mesh, P("data"))
  on_mesh = [jax.device_put(x, data) for x in (audio, text, clip_ids)]
  value, grads = jax.jit(jax.value_and_grad(sharded_fn, argnums=(0, 1, 3)))(
    *on_mesh, params, tuple(jax.device_put(t, data) for t in teachers)
  )
  expected_value, expected_grads = jax.jit(jax.value_and_grad(unsharded_fn, argnums=(0, 1, 3)))(
    audio, text, clip_ids, params, teachers
  )
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  jaxpr = str(jax.make_jaxpr(sharded_fn)(audio, text, clip_ids, params, teachers))
  assert "f32[8,64]" in jaxpr and "[64,64]" not in jaxpr  # rows of the teacher matrix, never all of it


@pytest.mark.parametrize("weight", [0.7, 0.0])
def test_the_terms_apart_are_each_loss_alone_and_leave_the_total_bit_for_bit(weight):
  mesh = make_data_mesh()
  rng = np.random.default_rng(7)
  audio, text, clip_ids = random_batch(rng, batch=32, dim=6, n_clips=10)
  teachers = _teachers(rng, 32)
  tau = 0.2
  params = init_loss_params("infonce", learnable=True, temperature=tau)
  expected = {"distill": reference_distillation(audio, text, *teachers, tau)}
  if weight:
    expected["contrastive"] = reference_infonce(audio, text, clip_ids, tau)
  data = NamedSharding(mesh, P("data"))
  for on_mesh in (None, mesh):
    put = (lambda x: x) if on_mesh is None else (lambda x: jax.device_put(x, data))
    args = [put(x.astype(np.float32)) for x in (audio, text)] + [put(clip_ids.astype(np.int32)), params]
    teachers_arg = tuple(put(t.astype(np.float32)) for t in teachers)
    loss_fn = make_loss_fn("infonce", on_mesh, weight=weight, distill_weight=1.5)
    value, grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 3)))(*args, teachers_arg)
    with_terms = jax.value_and_grad(functools.partial(loss_fn, terms=True), argnums=(0, 1, 3), has_aux=True)
    (value_again, terms), grads_again = jax.jit(with_terms)(*args, teachers_arg)
    for got, want in zip(jax.tree.leaves((value_again, grads_again)), jax.tree.leaves((value, grads)), strict=True):
      np.testing.assert_array_equal(got, want)  # Reporting the terms changes neither the total nor its gradients.
    assert sorted(terms) == sorted(expected)
    for name, term in terms.items():
      np.testing.assert_allclose(term, expected[name], rtol=1e-5)  # float64 numpy, each term apart.
    alone = {
      "contrastive": make_loss_fn("infonce", on_mesh)(*args),
      "distill": make_loss_fn("infonce", on_mesh, weight=0.0, distill_weight=1.0)(*args, teachers_arg),
    }
    for name, term in terms.items():
      np.testing.assert_allclose(term, alone[name], rtol=1e-6)
    np.testing.assert_allclose(weight * terms.get("contrastive", 0.0) + 1.5 * terms["distill"], value, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("accum_steps", [1, 2])
def test_the_training_step_reports_the_terms_and_takes_the_same_step(tmp_path, accum_steps):
  from atr_jax.models.dual_encoder import build_model
  from atr_jax.train_state import create_train_state, make_optimizer

  config = tiny_config(tmp_path)
  config.data.train_max_frames = 64
  mesh = sharding.create_mesh()
  tx, _ = make_optimizer(config.optim, steps_per_epoch=10)
  state, shardings = create_train_state(config, build_model(config.model), tx, mesh, jax.random.key(0, impl="rbg"))
  rng = np.random.default_rng(8)
  teacher_audio, teacher_text = (x.astype(np.float32) for x in _teachers(rng, config.train.global_batch_size))
  batch = {**_batch(config, 0), distillation.AUDIO_KEY: teacher_audio, distillation.TEXT_KEY: teacher_text}
  batch = sharding.global_batch(batch, mesh)
  loss_fn = make_loss_fn_from_config(config.loss, mesh, distill_weight=0.5)

  def step(fn):
    return jax.jit(
      functools.partial(
        train.train_step, loss_fn=fn, rng=jax.random.key(1, impl="rbg"), accum_steps=accum_steps, num_shards=mesh.size
      ),
      in_shardings=(shardings, sharding.batch_sharding(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)),
      compiler_options={"xla_backend_optimization_level": 0},  # Compiles faster, computes the same function.
    )(state, batch)

  new_state, metrics = step(loss_fn)
  # The same loss with nothing reported apart: the step's total and its update are unchanged, bit for bit.
  plain_state, plain_metrics = step(lambda *args, terms: (loss_fn(*args), {}))
  assert sorted(metrics) == sorted([*plain_metrics, "loss_contrastive", "loss_distill"])
  leaves = (jax.tree.leaves((s, m["loss"])) for s, m in ((new_state, metrics), (plain_state, plain_metrics)))
  for got, want in zip(*leaves, strict=True):
    np.testing.assert_array_equal(got, want)
  weighted = config.loss.weight * metrics["loss_contrastive"] + 0.5 * metrics["loss_distill"]
  np.testing.assert_allclose(weighted, metrics["loss"], rtol=1e-6)


def test_bad_distillation_arguments_are_rejected():
  audio, ids = jnp.ones((4, 3)), jnp.arange(4)
  with pytest.raises(ValueError, match="has none"):
    make_loss_fn("siglip", None, distill_weight=1.0, scale=1.0, bias=0.0)
  with pytest.raises(ValueError, match="teachers must be given"):
    make_loss_fn("infonce", None, distill_weight=1.0, temperature=0.1)(audio, audio, ids, {})
  with pytest.raises(ValueError, match="one shape"):
    make_loss_fn("infonce", None, distill_weight=1.0, temperature=0.1)(
      audio, audio, ids, {}, (jnp.ones((4, 1, 3)), jnp.ones((4, 2, 3)))
    )
  with pytest.raises(ValueError, match="one of them positive"):
    make_loss_fn("infonce", None, weight=0.0, temperature=0.1)
  config = get_base_config()
  config.loss.weight = 2.0
  loss = make_loss_fn_from_config(config.loss, None)
  rng = np.random.default_rng(3)
  a, t, c = random_batch(rng, batch=8, dim=4, n_clips=3)
  np.testing.assert_allclose(loss(a, t, c, {}), 2.0 * reference_infonce(a, t, c, 0.07), rtol=1e-5)


def _keys(rng, dataset="clotho", clips=6):
  names = [f"clip_{i:02d}.wav" for i in range(clips)]
  captions = [[f"caption {j} of {name}" for j in range(rng.integers(1, 4))] for name in names]
  return distillation.SourceKeys(dataset, "development", names, captions)


def _write_shuffled_teacher(folder, rng, sources, width, drop=(), made_by=None):
  """A teacher of `sources` holding its clips in a shuffled order (minus the file names `drop`), made by the model
  whose record is `made_by` (default: a workdir that is not here); returns the embeddings it holds, by (dataset, file
  name) and by (dataset, file name, caption index)."""
  keys, audio, text, by_clip, by_caption = [], [], [], {}, {}
  for source in sources:
    order = [i for i in rng.permutation(len(source.file_names)) if source.file_names[i] not in drop]
    names, captions = [source.file_names[i] for i in order], [source.captions[i] for i in order]
    keys.append(distillation.SourceKeys(source.dataset, source.split, names, captions))
    clip_emb = _unit(rng.normal(size=(len(names), width)))
    caption_emb = _unit(rng.normal(size=(sum(map(len, captions)), width)))
    audio.append(clip_emb)
    text.append(caption_emb)
    row = 0
    for name, clip_captions, emb in zip(names, captions, clip_emb):
      by_clip[(source.dataset, name)] = emb
      for index in range(len(clip_captions)):
        by_caption[(source.dataset, name, index)] = caption_emb[row]
        row += 1
  distillation.write_teacher(str(folder), keys, audio, text, made_by or {"workdir": "test"})
  return by_clip, by_caption


def test_lookup_is_by_identity_whatever_the_order(tmp_path):
  rng = np.random.default_rng(4)
  training = [_keys(rng, "clotho", 6), _keys(rng, "audio_caps", 5)]  # clip ids 0-5, then 6-10 (pipeline numbering)
  first, second = (
    _write_shuffled_teacher(tmp_path / name, rng, training, width) for name, width in (("a", 4), ("b", 6))
  )
  teachers = distillation.Teachers([str(tmp_path / "a"), str(tmp_path / "b")], training)
  pairs = [
    (offset + clip, index)
    for offset, source in ((0, training[0]), (6, training[1]))
    for clip, captions in enumerate(source.captions)
    for index in range(len(captions))
  ]
  for order in (np.arange(len(pairs)), rng.permutation(len(pairs))):  # Two data orders.
    clip_ids, caption_index = (np.array(column, np.int32) for column in zip(*[pairs[i] for i in order]))
    audio, text = teachers.lookup(clip_ids, caption_index)
    assert audio.shape == text.shape == (len(pairs), 2, 6)
    for row, (clip, index) in enumerate(zip(clip_ids, caption_index)):
      source = training[0] if clip < 6 else training[1]
      key = (source.dataset, source.file_names[clip if clip < 6 else clip - 6])
      for k, (by_clip, by_caption) in enumerate((first, second)):
        width = len(by_clip[key])
        np.testing.assert_allclose(audio[row, k, :width], by_clip[key], rtol=1e-6)
        np.testing.assert_allclose(text[row, k, :width], by_caption[(*key, index)], rtol=1e-6)
        assert not audio[row, k, width:].any()  # Zero padding to the widest teacher.
  batch = {"clip_id": clip_ids[:3], "caption_index": caption_index[:3]}
  (with_teachers,) = teachers.add_to([batch])
  np.testing.assert_array_equal(with_teachers[distillation.TEXT_KEY], text[:3])


def test_a_teacher_missing_clips_or_with_other_captions_is_an_error(tmp_path):
  rng = np.random.default_rng(5)
  training = [_keys(rng, "clotho", 8)]
  _write_shuffled_teacher(tmp_path / "t", rng, training, 4, drop=("clip_03.wav", "clip_06.wav"))
  with pytest.raises(ValueError, match=r"2 of the 8 training clips are missing.*clotho:clip_03.wav.*clotho:clip_06"):
    distillation.Teachers([str(tmp_path / "t")], training)
  with pytest.raises(ValueError, match=str(tmp_path / "t")):
    distillation.Teachers([str(tmp_path / "t")], training)
  _write_shuffled_teacher(tmp_path / "u", rng, training, 4)
  training[0].captions[2][0] = "another caption"
  with pytest.raises(ValueError, match="1 of the 8 training clips have other captions"):
    distillation.Teachers([str(tmp_path / "u")], training)
  with pytest.raises(FileNotFoundError, match="not a teacher folder"):
    distillation.Teachers([str(tmp_path / "nothing")], training)


@pytest.mark.slow
def test_a_tiny_student_distils_from_the_tiny_trained_run(tiny_trained, tmp_path):
  from atr_jax import api, retrieve
  from data_pipelines import datasets, input_pipeline

  teacher_config, teacher_workdir = tiny_trained
  folder = str(tmp_path / "teacher")
  retriever = api.Model(teacher_workdir)
  counts = retrieve.embed_training_set(retriever, folder)
  sources = datasets.train_sources(teacher_config.data)
  (builder, split), keys = sources[0], distillation.source_keys(*sources[0])
  assert counts == {"clips": len(keys.file_names), "captions": sum(map(len, keys.captions))}
  with open(os.path.join(folder, distillation.MANIFEST_FILE)) as f:
    assert json.load(f)["model_fingerprint"] == model_identity.of_workdir(teacher_workdir).fingerprint
  # The stored rows are the evaluation embeddings of the training clips and captions.
  embedded = retriever.embed_split(builder, split)
  teachers = distillation.Teachers([folder], [keys])
  # The pipeline's (clip_id, caption_index) name the batch's caption, so the lookup finds that caption's row.
  first_caption = np.cumsum([0] + [len(c) for c in keys.captions])
  for batch in input_pipeline.train_dataset(sources, batch_size=8, max_frames=64, seed=3, epoch=1).as_numpy_iterator():
    audio, text = teachers.lookup(batch["clip_id"], batch["caption_index"])
    for clip, index, caption in zip(batch["clip_id"], batch["caption_index"], batch["caption"]):
      assert keys.captions[clip][index] == embedded.captions[first_caption[clip] + index] == caption.decode()
    np.testing.assert_allclose(audio[:, 0], _unit(embedded.audio[batch["clip_id"]]), atol=1e-6)
    rows = first_caption[batch["clip_id"]] + batch["caption_index"]
    np.testing.assert_allclose(text[:, 0], _unit(embedded.text[rows]), atol=1e-6)

  config = tiny_config(os.path.dirname(teacher_workdir))  # The teacher's data.
  config.model.audio.channels = (4, 4, 4, 8, 8, 8)  # A narrower student.
  config.train.num_epochs = 1
  config.train.grad_accum_steps = 2  # Gradient caching: the loss (and its teacher rows) on the whole global batch.
  config.distill.teachers = folder
  workdir = str(tmp_path / "student")
  config.distill.weight = 0.5
  metrics = train.train_and_evaluate(config, workdir)
  assert np.isfinite(metrics["t2a_R1"])
  # The loss's terms apart in TensorBoard, at the steps of the total, weighing up to it; none without distillation.
  total, contrastive, distill = (
    tensorboard_scalars(workdir, f"train/{tag}") for tag in ("loss", "loss_contrastive", "loss_distill")
  )
  assert total and sorted(total) == sorted(contrastive) == sorted(distill)
  for step, value in total.items():
    np.testing.assert_allclose(config.loss.weight * contrastive[step] + 0.5 * distill[step], value, rtol=1e-5)
  assert tensorboard_scalars(teacher_workdir, "train/loss") and not tensorboard_scalars(
    teacher_workdir, "train/loss_distill"
  )
  config.data.train_split = "validation"  # Clips the teacher did not embed: an error before anything compiles.
  with pytest.raises(ValueError, match=rf"\d+ of the 8 training clips are missing from the teacher folder {folder}"):
    train.train_and_evaluate(config, str(tmp_path / "other_student"))


def test_a_teacher_folder_is_checked_against_the_run_that_made_it(tiny_trained, tmp_path, caplog):
  _, workdir = tiny_trained
  run = str(tmp_path / "run")
  shutil.copytree(workdir, run)
  made_by = model_identity.of_workdir(run)
  rng = np.random.default_rng(6)
  training = [_keys(rng, "clotho", 6)]
  teacher, early = str(tmp_path / "teacher"), str(tmp_path / "early")
  _write_shuffled_teacher(teacher, rng, training, 4, made_by=made_by.record())
  distillation.Teachers([teacher], training)
  # Written at an earlier best checkpoint of the run (it trained on since).
  _write_shuffled_teacher(early, rng, training, 4, made_by=dataclasses.replace(made_by, step=made_by.step - 1).record())
  with pytest.raises(model_identity.ModelMismatch, match=rf"at step {made_by.step - 1} .* at step {made_by.step} "):
    distillation.Teachers([teacher, early], training)

  changed = model_identity.of_workdir(set_in_config(run, "model.head_hidden", 64))  # Since the folder was written.
  with pytest.raises(model_identity.ModelMismatch) as error:
    distillation.Teachers([teacher], training)
  assert str(error.value) == (
    f"the teacher folder {teacher} was made by {run} at step {made_by.step} (model config {made_by.fingerprint}), "
    f"not by the model using it: {run} at step {made_by.step} (model config {changed.fingerprint}); config changes: "
    f"model.head_hidden: 32 -> 64. Rebuild it: python -m atr_jax.retrieve embed-train --workdir={run} --out={teacher}"
  )

  # Written before fingerprints (the manifest held workdir, step and model): checked by step, else a warning.
  old = {"workdir": run, "step": made_by.step, "model": made_by.embedding_config["model"]}
  _write_shuffled_teacher(teacher, rng, training, 4, made_by=old)
  with caplog.at_level(logging.WARNING, logger="absl"):
    distillation.Teachers([teacher], training)
  assert f"the teacher folder {teacher} records no model fingerprint" in caplog.text
  assert f"Rebuild it: python -m atr_jax.retrieve embed-train --workdir={run} --out={teacher}" in caplog.text
  _write_shuffled_teacher(teacher, rng, training, 4, made_by={**old, "step": made_by.step - 1})
  with pytest.raises(
    model_identity.ModelMismatch, match=rf"at step {made_by.step - 1}, not by .* at step {made_by.step} "
  ):
    distillation.Teachers([teacher], training)
  # A run that is not here cannot be checked: a warning.
  _write_shuffled_teacher(teacher, rng, training, 4, made_by={**made_by.record(), "workdir": str(tmp_path / "gone")})
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="absl"):
    distillation.Teachers([teacher], training)
  assert f"the run that made {teacher} ('{tmp_path / 'gone'}') is not here" in caplog.text
