"""Training and evaluation loop: `train_and_evaluate(config, workdir)` and `evaluate_best(config, workdir)`.

The train state is born sharded over the data mesh (`jax.eval_shape` + jit `out_shardings`), the step is one
jitted pure function over a batch sharded on 'data' (optionally in micro-batches, with the contrastive loss still
on the global batch), and the contrastive loss sees the global batch (see losses). Checkpoints keep the latest
state (every `train.checkpoint_every_steps` and at epoch ends) and the best by a validation metric; a restarted run
resumes exactly (same data order, random streams and schedule state). The best checkpoint is scored on the test
split at the end and written to `workdir/results.json`.
"""

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers

from atr_jax import (
  checkpointing,
  console,
  distillation,
  evaluation,
  losses,
  preflight,
  relevance,
  resume,
  sharding,
  summaries,
  tokenization,
  watchdog,
  zeroshot,
)
from atr_jax.atomic_files import write_text_atomically
from atr_jax.train_state import TrainState, create_train_state, make_optimizer, reduce_on_plateau
from atr_jax.metrics import format_metrics_table, retrieval_metrics
from atr_jax.models.cnn14 import BATCH_MOMENTS, update_running_statistics
from atr_jax.models.dual_encoder import build_model
from atr_jax.models.registry import audio_inputs, audio_tower
from data_pipelines import audio_forms, datasets, input_pipeline


def _forward(state: TrainState, model_params, batch_stats, batch: dict, rng, collection: str = "batch_stats"):
  """Training-mode embeddings of `batch` and the new value of the mutable `collection`: the updated BatchNorm
  running statistics, or with BATCH_MOMENTS each BatchNorm layer's batch moments (running statistics unchanged)."""
  dropout_rng, augment_rng = jax.random.split(rng)
  (audio_emb, text_emb), updates = state.apply_fn(
    {"params": model_params, "batch_stats": batch_stats},
    *audio_inputs(batch),
    batch["input_ids"],
    batch["attention_mask"],
    train=True,
    mutable=[collection],
    rngs={"dropout": dropout_rng, "augment": augment_rng},
  )
  return (audio_emb, text_emb), updates.get(collection, {})


def _cut_frozen(model_params: dict, frozen: tuple[str, ...]) -> dict:
  """`model_params` with the subtrees named in `frozen` (optim.frozen) cut from autodiff: their gradients are zeros
  that are never computed (no backward pass through a frozen tower)."""
  return {name: jax.lax.stop_gradient(p) if name in frozen else p for name, p in model_params.items()}


def _split_micro_batches(x: jax.Array, accum_steps: int, num_shards: int) -> jax.Array:
  """(B, ...) -> (accum_steps, B / accum_steps, ...): micro-batch m holds the m-th piece of every device's rows, so
  that no row changes device."""
  local = x.shape[0] // num_shards
  x = x.reshape(num_shards, accum_steps, local // accum_steps, *x.shape[1:]).swapaxes(0, 1)
  return x.reshape(accum_steps, x.shape[1] * x.shape[2], *x.shape[3:])


def _join_micro_batches(x: jax.Array, num_shards: int) -> jax.Array:
  """The inverse of `_split_micro_batches`."""
  accum_steps, rows = x.shape[:2]
  x = x.reshape(accum_steps, num_shards, rows // num_shards, *x.shape[2:]).swapaxes(0, 1)
  return x.reshape(accum_steps * rows, *x.shape[3:])


def _cached_gradients(
  state: TrainState, batch: dict, loss_fn, rng, accum_steps: int, num_shards: int, frozen: tuple[str, ...]
):
  """Gradient caching: the loss on the whole global batch with activations held for one micro-batch at a time.

  Pass 1 computes every micro-batch's embeddings without gradients; the loss and its gradient with respect to the
  embeddings are taken on the whole batch; pass 2 recomputes each micro-batch's forward pass and back-propagates
  its slice of those embedding gradients, summing the parameter gradients. Both passes give a micro-batch the same
  random keys, so the gradients are those of the loss of the whole batch when each micro-batch runs the model apart:
  the one-batch gradient up to rounding, except that BatchNorm normalises each micro-batch by its own moments (and
  micro-batches draw different dropout and SpecAugment bits than one batch would). BatchNorm running statistics take
  one momentum update per step, from each layer's moments pooled over all micro-batches (`update_running_statistics`).
  """
  params = state.params
  micro = jax.tree.map(lambda x: _split_micro_batches(x, accum_steps, num_shards), batch)
  rngs = jax.random.split(rng, accum_steps)

  def embed(_, inputs):
    micro_batch, micro_rng = inputs
    return None, _forward(state, params["model"], state.batch_stats, micro_batch, micro_rng, BATCH_MOMENTS)

  _, ((audio_emb, text_emb), moments) = jax.lax.scan(embed, None, (micro, rngs))
  audio_emb, text_emb = (_join_micro_batches(jax.lax.stop_gradient(e), num_shards) for e in (audio_emb, text_emb))
  (loss, terms), (audio_grad, text_grad, loss_grads) = jax.value_and_grad(
    functools.partial(loss_fn, terms=True), argnums=(0, 1, 3), has_aux=True
  )(audio_emb, text_emb, batch["clip_id"], params["loss"], distillation.batch_teachers(batch))
  embedding_grads = tuple(_split_micro_batches(g, accum_steps, num_shards) for g in (audio_grad, text_grad))

  def backprop(grads, inputs):
    micro_batch, micro_rng, micro_grads = inputs
    _, pullback, _ = jax.vjp(
      lambda p: _forward(state, _cut_frozen(p, frozen), state.batch_stats, micro_batch, micro_rng, BATCH_MOMENTS),
      params["model"],
      has_aux=True,
    )
    (model_grads,) = pullback(micro_grads)
    return jax.tree.map(jnp.add, grads, model_grads), None

  zeros = jax.tree.map(jnp.zeros_like, params["model"])
  model_grads, _ = jax.lax.scan(backprop, zeros, (micro, rngs, embedding_grads))
  batch_stats = update_running_statistics(state.batch_stats, moments)
  return loss, terms, {"model": model_grads, "loss": loss_grads}, batch_stats


def train_step(
  state: TrainState,
  batch: dict,
  *,
  loss_fn,
  rng,
  accum_steps: int = 1,
  num_shards: int = 1,
  frozen: tuple[str, ...] = (),
):
  """One optimizer step on a global batch; returns the new state and replicated scalar metrics (loss, its terms apart
  when it has several: loss_contrastive and loss_distill (see losses), grad_norm of the trainable parameters, and the
  loss's learnable hyper-parameters: temperature, siglip_scale/bias).

  With `accum_steps` > 1 the batch is processed in that many micro-batches (gradient caching, see
  `_cached_gradients`); `num_shards` is the number of devices the batch is sharded over. The model subtrees named
  in `frozen` (optim.frozen) get zero gradients without a backward pass through them. A batch with teacher
  embeddings (`distillation.AUDIO_KEY`, `TEXT_KEY`) gives them to `loss_fn` (distillation).
  """
  step_rng = jax.random.fold_in(rng, state.step)
  if accum_steps == 1:

    def compute_loss(params):
      (audio_emb, text_emb), batch_stats = _forward(
        state, _cut_frozen(params["model"], frozen), state.batch_stats, batch, step_rng
      )
      loss, terms = loss_fn(
        audio_emb, text_emb, batch["clip_id"], params["loss"], distillation.batch_teachers(batch), terms=True
      )
      return loss, (batch_stats, terms)

    (loss, (batch_stats, terms)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
  else:
    loss, terms, grads, batch_stats = _cached_gradients(
      state, batch, loss_fn, step_rng, accum_steps, num_shards, frozen
    )
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return new_state, {
    "loss": loss,
    **{f"loss_{name}": value for name, value in terms.items()},
    "grad_norm": optax.global_norm(grads),
    **losses.learnable_values(state.params["loss"]),
  }


class _Setup:
  """Everything train and evaluate share, built once from the config. With training=False (test only) the
  training sources (extra_train) are neither checked nor prepared."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, training: bool = True):
    preflight.check(config, training=training)  # Missing folders and files fail here, before any work.
    input_pipeline.leave_accelerators_to_jax()
    self.config = config
    self.workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(self.workdir, exist_ok=True)
    if training:
      self.sources = datasets.train_sources(config.data)  # [(builder, split)]: the main dataset first.
      self.builder = self.sources[0][0]  # Validation and test splits come from it.
    else:
      self.sources, self.builder = None, datasets.prepare_builder(config.data)
    console.phase(
      "Data: %s",
      "; ".join(
        f"{builder.name} {split} ({input_pipeline.num_clips(builder, split)} clips, "
        f"{input_pipeline.train_pairs_per_epoch(builder, split)} captions)"
        for builder, split in (self.sources or [(self.builder, config.data.test_split)])
      ),
    )
    self.mesh = sharding.create_mesh()
    self.local_batch_size = sharding.check_global_batch(config.train.global_batch_size, "train.global_batch_size")
    sharding.check_global_batch(config.eval.batch_size, "eval.batch_size")
    if config.eval.selection_metric == "loss":
      raise ValueError(
        "config.eval.selection_metric='loss': selection keeps the highest value; choose a retrieval "
        "metric such as t2a_mAP10"
      )
    self.num_input_shards = config.data.num_input_shards or jax.process_count()
    self.accum_steps = config.train.grad_accum_steps
    per_device = config.train.global_batch_size // jax.device_count()
    if self.accum_steps < 1 or per_device % self.accum_steps:
      raise ValueError(
        f"train.grad_accum_steps={self.accum_steps} must be a positive divisor of the per-device "
        f"batch ({per_device} = train.global_batch_size / {jax.device_count()} devices)"
      )
    self.train_max_frames = (
      input_pipeline.train_max_frames(self.sources, config.data.train_max_frames, config.data.extra_train_max_frames)
      if training
      else None
    )
    # Test only: the learning-rate schedule does not matter, only the optimizer state's structure.
    self.steps_per_epoch = (
      input_pipeline.steps_per_epoch(self.sources, config.train.global_batch_size) if training else 1
    )
    # Ensemble distillation (config.distill): the teacher folders are checked against the training set here, before
    # anything compiles; the training batches carry each pair's teacher embeddings (`train_batches`).
    self.teachers = distillation.Teachers.from_config(config.distill, self.sources) if training else None
    self.loss_fn = losses.make_loss_fn_from_config(
      config.loss, self.mesh, distill_weight=config.distill.weight if self.teachers else 0.0
    )
    self.encode_captions = tokenization.caption_encoder(config)
    self.model = build_model(config.model)
    # What the records hold (preflight checked that it is what the audio tower takes).
    self.audio_form = audio_forms.audio_form(config.data.audio_feature)
    self.tx, self.schedule = make_optimizer(config.optim, self.steps_per_epoch, config.train.num_epochs)
    # rbg keys compile the many random draws of parameter init ~5x faster on CPU; threefry drives training.
    self.init_rng = jax.random.key(config.seed, impl="rbg")
    self.train_rng = jax.random.key(config.seed)
    self.manager = checkpointing.create_manager(self.workdir, config.eval.selection_metric)
    self.embedder = None  # Made by `fresh_state`, for the state's shardings.
    self.zeroshot = (
      zeroshot.DuringTraining(config.eval.zeroshot, config.data.audio_feature)
      if training and zeroshot.enabled(config.eval.zeroshot)
      else None
    )

  def fresh_state(self):
    state, shardings = create_train_state(self.config, self.model, self.tx, self.mesh, self.init_rng)
    self.embedder = evaluation.Embedder(
      self.model,
      self.mesh,
      {"params": shardings.params["model"], "batch_stats": shardings.batch_stats},
      max_segment_s=self.config.eval.max_segment_s,
    )
    return state, shardings

  def restore(self, step: int, state, shardings):
    abstract = checkpointing.abstract_with_shardings(jax.eval_shape(lambda: state), shardings)
    return checkpointing.restore(self.manager, step, abstract)

  def embed(self, state, split: str) -> evaluation.SplitEmbeddings:
    variables = {"params": state.params["model"], "batch_stats": state.batch_stats}
    return evaluation.embed_split(
      self.embedder,
      variables,
      self.builder,
      split,
      encode_captions=self.encode_captions,
      global_batch_size=self.config.eval.batch_size,
      max_frames=audio_tower(self.config.model.audio).max_frames,
    )

  def evaluate(self, state, split: str) -> dict:
    """Retrieval metrics of `split`, with the graded ones of eval.relevance_csv (which describes the test split)."""
    emb = self.embed(state, split)
    metrics = retrieval_metrics(emb.audio, emb.text, emb.caption_clip_ids)
    if self.config.eval.relevance_csv and split == self.config.data.test_split:
      table = relevance.read_relevance_csv(os.path.expanduser(self.config.eval.relevance_csv))
      metrics.update(relevance.graded_metrics(emb.text @ emb.audio.T, emb.captions, emb.file_names, table))
    return metrics

  def zeroshot_accuracy(self, state) -> dict:
    """Zero-shot accuracy per fold and mean on config.eval.zeroshot's set (`zeroshot.DuringTraining`)."""
    variables = {"params": state.params["model"], "batch_stats": state.batch_stats}
    batch_size = self.config.eval.batch_size
    return self.zeroshot(
      lambda clips: evaluation.embed_clips(
        self.embedder, variables, clips, self.audio_form, global_batch_size=batch_size
      ),
      lambda texts: evaluation.embed_captions(
        self.embedder, variables, texts, encode_captions=self.encode_captions, global_batch_size=batch_size
      ),
    )

  def train_batches(self, epoch: int, skip_batches: int):
    """This process's model-ready numpy slices of the global batches of `epoch`, from batch `skip_batches` on."""
    batches = input_pipeline.process_train_batches(
      self.sources,
      encode_captions=self.encode_captions,
      global_batch_size=self.config.train.global_batch_size,
      num_shards=self.num_input_shards,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      max_frames=self.train_max_frames,
      extra_max_frames=self.config.data.extra_train_max_frames,
      seed=self.config.seed,
      epoch=epoch,
      shuffle_buffer=self.config.data.shuffle_buffer,
      skip_batches=skip_batches,
    )
    return self.teachers.add_to(batches) if self.teachers else batches


def validation_loss(emb: evaluation.SplitEmbeddings, loss_fn, loss_params, batch_size: int, seed: int) -> float:
  """Mean training loss over the validation (clip, caption) pairs in batches of `batch_size`, in a fixed
  seeded order (all pairs in one batch when there are fewer), from evaluation-mode embeddings."""
  order = np.random.default_rng(seed).permutation(len(emb.text))
  batch_size = min(batch_size, len(order))
  batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
  values = [
    loss_fn(emb.audio[emb.caption_clip_ids[rows]], emb.text[rows], emb.caption_clip_ids[rows], loss_params)
    for rows in batches
  ]
  return float(np.mean(jax.device_get(values)))


def _check_finite(metrics: dict, step: int, manager) -> dict:
  """Host scalars of `metrics`; raises FloatingPointError when the loss is NaN or infinite."""
  scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not np.isfinite(scalars["loss"]):
    last = manager.latest_step()
    kept = (
      f"the last good checkpoint (step {last}) in {manager.directory} is kept"
      if last is not None
      else "no checkpoint was saved yet"
    )
    raise FloatingPointError(
      f"training loss is {scalars['loss']} at or before step {step}: stopping; {kept}. "
      f"Lower optim.learning_rate or check the data."
    )
  return scalars


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  allow_config_change: bool = False,
  allow_data_change: bool = False,
) -> dict:
  """Trains (resuming exactly from the workdir's latest checkpoint), then scores the best checkpoint on the test
  split. Resuming with another value of a key of RESUME_KEYS is refused unless `allow_config_change`, and on changed
  training data (`resume.check_data`) unless `allow_data_change`. The workdir's config.json is written once the
  checkpoint is restored: a resume that fails leaves the workdir as it was."""
  changed = resume.changed_config_keys(config, workdir)
  if changed and not allow_config_change:
    raise checkpointing.CheckpointError(
      f"{workdir} holds a run trained with another data order or step count; resuming it with this "
      f"config would not continue it ({'; '.join(changed)}). Train into a new --workdir, or pass "
      "--allow_config_change to resume anyway."
    )
  if changed:
    logging.warning("Resuming %s with a changed config (--allow_config_change): %s", workdir, "; ".join(changed))
  setup = _Setup(config, workdir)
  state, shardings = setup.fresh_state()
  data = resume.data_fingerprint(setup.sources, setup.steps_per_epoch)
  latest = setup.manager.latest_step()
  if latest is not None:
    resume.check_data(setup.manager, latest, data, config, allow_data_change=allow_data_change)
    console.phase("Resuming from the checkpoint of step %d in %s", latest, setup.workdir)
    state = setup.restore(latest, state, shardings)
  if jax.process_index() == 0:  # Read back by `atr_jax.retrieve` to rebuild the model.
    write_text_atomically(os.path.join(setup.workdir, checkpointing.CONFIG_FILE), config.to_json_best_effort(indent=2))
  writer = metric_writers.create_default_writer(setup.workdir, just_logging=jax.process_index() > 0)
  if latest is None:
    writer.write_hparams({k: str(v) for k, v in _flatten(config.to_dict()).items()})

  loss_fn = setup.loss_fn
  step_fn = jax.jit(
    functools.partial(
      train_step,
      loss_fn=loss_fn,
      rng=setup.train_rng,
      accum_steps=setup.accum_steps,
      num_shards=jax.device_count(),
      frozen=tuple(config.optim.frozen),
    ),
    in_shardings=(shardings, sharding.batch_sharding(setup.mesh)),
    out_shardings=(shardings, sharding.replicated(setup.mesh)),
    donate_argnums=0,
  )
  val_loss_fn = jax.jit(losses.make_loss_fn_from_config(config.loss, None))
  total_steps = setup.steps_per_epoch * config.train.num_epochs
  checkpoint_every = config.train.checkpoint_every_steps
  step = int(state.step)
  console.phase(
    "Training: %d epochs x %d steps of %d pairs (crops of %d frames) on %d devices (%d processes, %d "
    "input shards, %d micro-batches); compiling the step first",
    config.train.num_epochs,
    setup.steps_per_epoch,
    config.train.global_batch_size,
    setup.train_max_frames,
    jax.device_count(),
    jax.process_count(),
    setup.num_input_shards,
    setup.accum_steps,
  )
  progress = console.TrainProgress(total_steps, step)
  compile_start = time.perf_counter()
  stall_watchdog = watchdog.StepWatchdog.for_this_job()  # Multi-process: a stalled step ends with an error.
  first_epoch, first_batch = resume.position(step, setup.steps_per_epoch)
  for epoch in range(first_epoch, config.train.num_epochs):
    for local in setup.train_batches(epoch, skip_batches=first_batch if epoch == first_epoch else 0):
      batch = sharding.global_batch(local, setup.mesh)
      state, metrics = step_fn(state, batch)
      step += 1
      stall_watchdog.dispatched(step, metrics)
      if step == progress.first_step + 1:
        progress.write(
          f"Compiled the training step in {time.perf_counter() - compile_start:.1f} s (first batch included)"
        )
        progress.restart_clock(step)  # Rates and ETA leave out the compilation of the first step.
      epoch_end = step % setup.steps_per_epoch == 0
      mid_epoch_save = checkpoint_every > 0 and step % checkpoint_every == 0 and not epoch_end
      if step % config.train.log_every_steps == 0 or epoch_end or mid_epoch_save:
        scalars = _check_finite(metrics, step, setup.manager)
        scalars.update(
          learning_rate=float(setup.schedule(step - 1)) * float(state.lr_scale),
          steps_per_sec=progress.steps_per_sec(step),
        )
        writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
        progress.update(step, epoch + 1, scalars["loss"])
      if mid_epoch_save:
        checkpointing.save(setup.manager, step, state, metrics=None, data=data)
    eval_start = time.perf_counter()
    val_emb = setup.embed(state, config.data.val_split)
    val_metrics = retrieval_metrics(val_emb.audio, val_emb.text, val_emb.caption_clip_ids)
    val_metrics["loss"] = validation_loss(
      val_emb, val_loss_fn, jax.device_get(state.params["loss"]), config.train.global_batch_size, config.seed
    )
    zeroshot_metrics = setup.zeroshot_accuracy(state) if setup.zeroshot is not None else {}
    eval_s = time.perf_counter() - eval_start
    if config.eval.num_retrieval_examples > 0:
      summaries.write_retrieval_examples(
        writer,
        step,
        val_emb,
        dataset=config.data.dataset,
        raw_dir=config.data.raw_dir,
        split=config.data.val_split,
        num_queries=config.eval.num_retrieval_examples,
      )
    if config.eval.selection_metric not in val_metrics:
      raise KeyError(
        f"config.eval.selection_metric={config.eval.selection_metric!r} is not one of {sorted(val_metrics)}"
      )
    if config.optim.schedule == "plateau":
      state = reduce_on_plateau(state, val_metrics["loss"], config.optim)
      val_metrics["lr_scale"] = float(state.lr_scale)
    writer.write_scalars(step, {f"val/{k}": v for k, v in val_metrics.items()})
    if zeroshot_metrics:
      writer.write_scalars(step, {f"zeroshot/{k}": v for k, v in zeroshot_metrics.items()})
    logging.info("epoch %d validation: %s", epoch + 1, {k: round(v, 4) for k, v in val_metrics.items()})
    progress.write(
      f"Epoch {epoch + 1}/{config.train.num_epochs} validation ({config.data.val_split}, {eval_s:.1f} s):"
      f" t2a R@1 {val_metrics['t2a_R1']:.3f} mAP@10 {val_metrics['t2a_mAP10']:.3f}, a2t R@1 "
      f"{val_metrics['a2t_R1']:.3f}, loss {val_metrics['loss']:.4f}"
      + (f", zero-shot accuracy {zeroshot_metrics['mean']:.3f}" if zeroshot_metrics else "")
    )
    checkpointing.save(setup.manager, step, state, val_metrics, data=data)
    progress.restart_clock(step)
  progress.close()
  writer.flush()
  return _evaluate_best_and_report(setup, state, shardings)


def evaluate_best(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Scores the workdir's best checkpoint on the test split and rewrites results.json."""
  setup = _Setup(config, workdir, training=False)
  if setup.manager.best_step() is None:
    raise FileNotFoundError(f"no checkpoint in {setup.manager.directory}: train first")
  state, shardings = setup.fresh_state()
  return _evaluate_best_and_report(setup, state, shardings)


def _evaluate_best_and_report(setup: _Setup, state, shardings) -> dict:
  best = setup.manager.best_step()
  state = setup.restore(best, state, shardings)
  split = setup.config.data.test_split
  console.phase("Testing the best checkpoint (step %d) on split %r", best, split)
  metrics = setup.evaluate(state, split)
  if jax.process_index() == 0:
    results = {**metrics, "split": split, "checkpoint_step": int(best)}
    path = os.path.join(setup.workdir, "results.json")
    write_text_atomically(path, json.dumps(results, indent=2))
    print(
      f"Best checkpoint (step {best}) on split {split!r}:\n{format_metrics_table(metrics)}\nwritten to {path}",
      flush=True,
    )
  return metrics


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat
