"""Training and evaluation loop: `train_and_evaluate(config, workdir)` and `evaluate_best(config, workdir)`.

The train state is born replicated over the data mesh (`jax.eval_shape` + jit `out_shardings`), the step is one
jitted pure function over a batch sharded on 'data', and the contrastive loss sees the global batch (see losses).
Checkpoints keep the latest state (automatic resume) and the best by a validation metric; the best one is scored on
the test split at the end and written to `workdir/results.json`.
"""
import functools
import json
import os
import time

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers

from atr_jax import checkpointing, evaluation, losses, sharding, summaries, tokenization
from atr_jax.train_state import TrainState, create_train_state, make_optimizer
from atr_jax.metrics import format_metrics_table, retrieval_metrics
from atr_jax.models.dual_encoder import build_model
from data_pipelines import datasets, input_pipeline

CONFIG_FILE = "config.json"  # The run's config, saved in the workdir.


def train_step(state: TrainState, batch: dict, *, loss_fn, rng):
  """One optimizer step on a global batch; returns the new state and replicated scalar metrics."""
  step_rng = jax.random.fold_in(rng, state.step)
  dropout_rng, augment_rng = jax.random.split(step_rng)

  def compute_loss(params):
    (audio_emb, text_emb), updates = state.apply_fn(
        {"params": params["model"], "batch_stats": state.batch_stats}, batch["log_mel"], batch["frame_mask"],
        batch["input_ids"], batch["attention_mask"], train=True, mutable=["batch_stats"],
        rngs={"dropout": dropout_rng, "augment": augment_rng})
    return loss_fn(audio_emb, text_emb, batch["clip_id"], params["loss"]), updates["batch_stats"]

  (loss, batch_stats), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return state, {"loss": loss, "grad_norm": optax.global_norm(grads)}


class _Setup:
  """Everything train and evaluate share, built once from the config."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(self.workdir, exist_ok=True)
    self.builder = datasets.prepare_builder(config.data)
    self.mesh = sharding.create_mesh()
    self.local_batch_size = sharding.check_global_batch(config.train.global_batch_size, "train.global_batch_size")
    sharding.check_global_batch(config.eval.batch_size, "eval.batch_size")
    self.steps_per_epoch = input_pipeline.steps_per_epoch(self.builder, config.data.train_split,
                                                          config.train.global_batch_size)
    if self.steps_per_epoch == 0:
      raise ValueError(f"split {config.data.train_split!r} holds fewer (clip, caption) pairs than one global batch "
                       f"({config.train.global_batch_size})")
    self.tokenizer = tokenization.load_tokenizer(config.model.text.model_dir)
    self.model = build_model(config.model)
    self.tx, self.schedule = make_optimizer(config.optim, self.steps_per_epoch)
    # rbg keys compile the many random draws of parameter init ~5x faster on CPU; threefry drives training.
    self.init_rng = jax.random.key(config.seed, impl="rbg")
    self.train_rng = jax.random.key(config.seed)
    self.manager = checkpointing.create_manager(self.workdir, config.eval.selection_metric)
    self.embedder = evaluation.Embedder(self.model, self.mesh)

  def fresh_state(self):
    return create_train_state(self.config, self.model, self.tx, self.mesh, self.init_rng)

  def restore(self, step: int, state, shardings):
    abstract = checkpointing.abstract_with_shardings(jax.eval_shape(lambda: state), shardings)
    return checkpointing.restore(self.manager, step, abstract)

  def embed(self, state, split: str) -> evaluation.SplitEmbeddings:
    variables = {"params": state.params["model"], "batch_stats": state.batch_stats}
    return evaluation.embed_split(
        self.embedder, variables, self.builder, split, tokenizer=self.tokenizer,
        max_len=self.config.model.text.max_len, global_batch_size=self.config.eval.batch_size,
        max_frames=self.config.data.eval_max_frames)

  def evaluate(self, state, split: str) -> dict:
    emb = self.embed(state, split)
    return retrieval_metrics(emb.audio, emb.text, emb.caption_clip_ids)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the workdir's latest checkpoint), then scores the best checkpoint on the test split."""
  setup = _Setup(config, workdir)
  if jax.process_index() == 0:  # Read back by `atr_jax.retrieve` to rebuild the model.
    _write_atomically(os.path.join(setup.workdir, CONFIG_FILE), config.to_json_best_effort(indent=2))
  state, shardings = setup.fresh_state()
  latest = setup.manager.latest_step()
  if latest is not None:
    logging.info("Resuming from the checkpoint of step %d in %s", latest, setup.workdir)
    state = setup.restore(latest, state, shardings)
  writer = metric_writers.create_default_writer(setup.workdir, just_logging=jax.process_index() > 0)
  if latest is None:
    writer.write_hparams({k: str(v) for k, v in _flatten(config.to_dict()).items()})

  loss_fn = losses.make_loss_fn_from_config(config.loss, setup.mesh)
  step_fn = jax.jit(functools.partial(train_step, loss_fn=loss_fn, rng=setup.train_rng),
                    in_shardings=(shardings, sharding.batch_sharding(setup.mesh)),
                    out_shardings=(shardings, sharding.replicated(setup.mesh)), donate_argnums=0)
  total_steps = setup.steps_per_epoch * config.train.num_epochs
  step = int(state.step)
  logging.info("Training: %d epochs x %d steps of %d pairs on %d devices (%d processes)", config.train.num_epochs,
               setup.steps_per_epoch, config.train.global_batch_size, jax.device_count(), jax.process_count())
  progress = _Progress(total_steps, step)
  for epoch in range(step // setup.steps_per_epoch, config.train.num_epochs):
    dataset = input_pipeline.train_dataset(
        setup.builder, config.data.train_split, batch_size=setup.local_batch_size,
        max_frames=config.data.train_max_frames, seed=config.seed, epoch=epoch,
        process_index=jax.process_index(), process_count=jax.process_count(),
        shuffle_buffer=config.data.shuffle_buffer, skip_batches=step - epoch * setup.steps_per_epoch)
    for local in dataset.as_numpy_iterator():
      tokens = tokenization.tokenize(setup.tokenizer, local["caption"], config.model.text.max_len)
      batch = sharding.global_batch({"log_mel": local["log_mel"], "frame_mask": local["frame_mask"],
                                     "clip_id": local["clip_id"], **tokens}, setup.mesh)
      state, metrics = step_fn(state, batch)
      step += 1
      if step == progress.first_step + 1:
        progress.restart_clock(step)  # Rates and ETA leave out the compilation of the first step.
      if step % config.train.log_every_steps == 0 or step % setup.steps_per_epoch == 0:
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(scalars["loss"]):
          raise FloatingPointError(f"training loss is {scalars['loss']} at step {step}; the last good checkpoint "
                                   f"in {setup.manager.directory} is kept (lower optim.learning_rate?)")
        scalars.update(learning_rate=float(setup.schedule(step - 1)), steps_per_sec=progress.steps_per_sec(step))
        writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
        logging.info("step %d/%d epoch %d loss %.4f  %.2f steps/s  ETA %s", step, total_steps, epoch + 1,
                     scalars["loss"], scalars["steps_per_sec"], progress.eta(step))
    eval_start = time.perf_counter()
    val_emb = setup.embed(state, config.data.val_split)
    val_metrics = retrieval_metrics(val_emb.audio, val_emb.text, val_emb.caption_clip_ids)
    logging.info("Evaluated %s in %.1f s", config.data.val_split, time.perf_counter() - eval_start)
    if config.eval.num_retrieval_examples > 0:
      summaries.write_retrieval_examples(writer, step, val_emb, raw_dir=config.data.raw_dir,
                                         split=config.data.val_split, num_queries=config.eval.num_retrieval_examples)
    if config.eval.selection_metric not in val_metrics:
      raise KeyError(f"config.eval.selection_metric={config.eval.selection_metric!r} is not one of "
                     f"{sorted(val_metrics)}")
    writer.write_scalars(step, {f"val/{k}": v for k, v in val_metrics.items()})
    logging.info("epoch %d validation: %s", epoch + 1, {k: round(v, 4) for k, v in val_metrics.items()})
    checkpointing.save(setup.manager, step, state, val_metrics)
    progress.restart_clock(step)
  writer.flush()
  return _evaluate_best_and_report(setup, state, shardings)


def evaluate_best(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Scores the workdir's best checkpoint on the test split and rewrites results.json."""
  setup = _Setup(config, workdir)
  if setup.manager.best_step() is None:
    raise FileNotFoundError(f"no checkpoint in {setup.manager.directory}: train first")
  state, shardings = setup.fresh_state()
  return _evaluate_best_and_report(setup, state, shardings)


def _evaluate_best_and_report(setup: _Setup, state, shardings) -> dict:
  best = setup.manager.best_step()
  state = setup.restore(best, state, shardings)
  split = setup.config.data.test_split
  metrics = setup.evaluate(state, split)
  if jax.process_index() == 0:
    results = {**metrics, "split": split, "checkpoint_step": int(best)}
    path = os.path.join(setup.workdir, "results.json")
    _write_atomically(path, json.dumps(results, indent=2))
    print(f"Best checkpoint (step {best}) on split {split!r}:\n{format_metrics_table(metrics)}\n"
          f"written to {path}", flush=True)
  return metrics


def _write_atomically(path: str, text: str) -> None:
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


class _Progress:
  """Steps per second and ETA over the steps since the clock was (re)started."""

  def __init__(self, total_steps: int, step: int):
    self.total_steps = total_steps
    self.first_step = step
    self.restart_clock(step)

  def restart_clock(self, step: int):
    self._start_step, self._start_time = step, time.perf_counter()

  def steps_per_sec(self, step: int) -> float:
    return (step - self._start_step) / max(time.perf_counter() - self._start_time, 1e-9)

  def eta(self, step: int) -> str:
    rate = self.steps_per_sec(step)
    seconds = int((self.total_steps - step) / rate) if rate > 0 else 0
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat
