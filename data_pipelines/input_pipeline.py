"""tf.data pipelines over prepared dataset builders (one record per clip): training batches of (clip, caption)
pairs, fixed-size evaluation batches of whole clips, and the caption tables that evaluation needs.

Training: each input shard reads its even share of the clips (`tfds.split_for_jax_process`) of every source (one or
more (builder, split) trained on together), shuffles them, flattens them to (clip, caption) pairs, shuffles the
pairs, gives each pair an independent uniform crop of `max_frames` frames (zero padding and a mask when the clip is
shorter), and batches them. Everything random is seeded from
(seed, epoch) (crops from (seed, epoch, clip_id, caption index) with stateless ops) and the pipeline runs with
`deterministic=True`, so an epoch's batches are reproducible, which is what makes `skip_batches` resume exact.
Every shard yields `steps_per_epoch` batches (a short shard is repeated) so that hosts stay in step; a process runs
its contiguous group of shards and concatenates their batches, so global batches do not depend on the process count.
"""
import functools

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from data_pipelines import features

try:
  tf.config.set_visible_devices([], "GPU")  # The accelerators belong to JAX.
except RuntimeError:  # TensorFlow was initialised before this import; its device choice stands.
  logging.warning("TensorFlow already initialised: could not hide the GPUs from tf.data")

DEFAULT_PAIR_SHUFFLE_BUFFER = 2048
DEFAULT_CLIP_SHUFFLE_BUFFER = 4096
_EVAL_KEYS = ("log_mel", "frame_mask", "clip_id", "valid")


def _num_clips(builder: tfds.core.DatasetBuilder, split) -> int:
  return builder.info.splits[split].num_examples


@functools.cache
def _caption_table(builder: tfds.core.DatasetBuilder, split: str) -> tuple[tuple[tuple[str, ...], ...],
                                                                         tuple[str, ...]]:
  """(captions, file_name) per clip id of `split`, read once per builder and split (log-mels left undecoded)."""
  clips = builder.as_dataset(split=split, shuffle_files=False, decoders={"log_mel": tfds.decode.SkipDecoding()},
                             read_config=tfds.ReadConfig(try_autocache=False))
  clips = clips.map(lambda clip: {k: clip[k] for k in ("captions", "file_name", "clip_id")})
  by_id = {int(clip["clip_id"]): clip for clip in clips.as_numpy_iterator()}
  if sorted(by_id) != list(range(len(by_id))):
    raise ValueError(f"{builder.data_dir} split {split}: clip ids are not 0..{len(by_id) - 1}")
  captions = tuple(tuple(c.decode("utf-8") for c in by_id[i]["captions"]) for i in range(len(by_id)))
  file_names = tuple(by_id[i]["file_name"].decode("utf-8") for i in range(len(by_id)))
  return captions, file_names


def train_pairs_per_epoch(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """Number of (clip, caption) pairs of `split`."""
  return sum(len(captions) for captions in _caption_table(builder, split)[0])


def steps_per_epoch(sources, global_batch: int) -> int:
  """Global batches per epoch over the (builder, split) `sources`: all their pairs // global_batch."""
  pairs = sum(train_pairs_per_epoch(builder, split) for builder, split in sources)
  steps = pairs // global_batch
  if steps == 0:
    names = ", ".join(f"{builder.name}:{split}" for builder, split in sources)
    raise ValueError(f"{names} hold {pairs} (clip, caption) pairs, fewer than the global batch {global_batch}")
  return steps


def eval_captions(builder: tfds.core.DatasetBuilder, split: str) -> tuple[list[str], np.ndarray, list[str]]:
  """All captions of `split` (ordered by clip id), the clip id of each (int32), and the file name per clip id."""
  captions, file_names = _caption_table(builder, split)
  flat = [caption for clip_captions in captions for caption in clip_captions]
  clip_ids = np.repeat(np.arange(len(captions), dtype=np.int32), [len(c) for c in captions])
  return flat, clip_ids, list(file_names)


def _stream_seeds(seed: int, epoch: int, count: int) -> list[int]:
  """`count` independent 63-bit seeds derived from (seed, epoch)."""
  return [int(s) >> 1 for s in np.random.SeedSequence([seed, epoch]).generate_state(count, dtype=np.uint64)]


def _crop_and_pad(log_mel: tf.Tensor, start: tf.Tensor, max_frames: int) -> tuple[tf.Tensor, tf.Tensor]:
  """`max_frames` frames of `log_mel` from `start` as float32, zero padded; mask True on real frames."""
  window = log_mel[start:start + max_frames]
  length = tf.shape(window)[0]
  padded = tf.pad(tf.cast(window, tf.float32), [[0, max_frames - length], [0, 0]])
  return tf.ensure_shape(padded, (max_frames, features.N_MELS)), tf.range(max_frames) < length


def _clip_to_pairs(clip: dict) -> tf.data.Dataset:
  captions = clip["captions"]
  pairs = tf.data.Dataset.from_tensor_slices(
      {"caption": captions, "caption_index": tf.range(tf.shape(captions)[0], dtype=tf.int32)})
  return pairs.map(lambda pair: {**pair, "log_mel": clip["log_mel"], "clip_id": clip["clip_id"]})


def _random_crop(pair: dict, base_seed: tf.Tensor, max_frames: int) -> dict:
  pair_seed = tf.random.experimental.stateless_fold_in(
      tf.random.experimental.stateless_fold_in(base_seed, pair["clip_id"]), pair["caption_index"])
  excess = tf.maximum(tf.shape(pair["log_mel"])[0] - max_frames, 0)
  start = tf.random.stateless_uniform((), pair_seed, minval=0, maxval=excess + 1, dtype=tf.int32)
  log_mel, frame_mask = _crop_and_pad(pair["log_mel"], start, max_frames)
  return {"log_mel": log_mel, "frame_mask": frame_mask, "caption": pair["caption"], "clip_id": pair["clip_id"]}


def _deterministic(dataset: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  return dataset.with_options(options)


def _source_clips(sources, shard_index: int, num_shards: int, file_seed: int, choice_seed: int) -> tf.data.Dataset:
  """The clips of input shard `shard_index` of every source, interleaved in a seeded random order in proportion to
  the sources' sizes; clip ids are offset so that they are unique over the sources (source order)."""
  datasets, counts, offset = [], [], 0
  for builder, split in sources:
    shard = tfds.split_for_jax_process(split, process_index=shard_index, process_count=num_shards)
    clips = builder.as_dataset(split=shard, shuffle_files=True,
                               read_config=tfds.ReadConfig(shuffle_seed=file_seed, try_autocache=False))
    datasets.append(clips.map(lambda clip, offset=offset: {**clip, "clip_id": clip["clip_id"] + offset}))
    counts.append(_num_clips(builder, shard))
    offset += _num_clips(builder, split)
  if len(datasets) == 1:
    return datasets[0]
  choices = np.random.default_rng(choice_seed).permutation(np.repeat(np.arange(len(counts), dtype=np.int64), counts))
  return tf.data.Dataset.choose_from_datasets(datasets, tf.data.Dataset.from_tensor_slices(choices))


def train_dataset(sources, *, batch_size: int, max_frames: int, seed: int, epoch: int, shard_index: int = 0,
                  num_shards: int = 1, shuffle_buffer: int = DEFAULT_PAIR_SHUFFLE_BUFFER,
                  clip_shuffle_buffer: int = DEFAULT_CLIP_SHUFFLE_BUFFER, skip_batches: int = 0) -> tf.data.Dataset:
  """Epoch `epoch` of input shard `shard_index` (of `num_shards`), from batch `skip_batches` on.

  `sources` is a list of (builder, split) trained on together (clip ids offset to stay unique). `batch_size` is
  the shard's batch (global // num_shards). Batches are dicts of `log_mel` float32 (b, max_frames, 64),
  `frame_mask` bool (b, max_frames), `caption` string (b,), `clip_id` int32 (b,); there are
  `steps_per_epoch(sources, batch_size * num_shards) - skip_batches` of them. Skipped batches are still read and
  shuffled (to reproduce the order) but not cropped.
  """
  steps = steps_per_epoch(sources, batch_size * num_shards)
  if not 0 <= skip_batches <= steps:
    raise ValueError(f"skip_batches={skip_batches} is outside [0, {steps}] (the epoch's batches)")
  file_seed, clip_seed, pair_seed, choice_seed = _stream_seeds(seed, epoch, 4)
  clips = _source_clips(sources, shard_index, num_shards, file_seed, choice_seed + shard_index)
  pairs = (clips.shuffle(clip_shuffle_buffer, seed=clip_seed)
           .flat_map(_clip_to_pairs)
           .shuffle(shuffle_buffer, seed=pair_seed)
           .repeat()  # A shard with fewer pairs than steps * batch_size goes round again.
           # Stop at the epoch's last pair: reading past it would make `repeat` refill the shuffle buffers.
           .take(steps * batch_size)
           .skip(skip_batches * batch_size))
  crop = functools.partial(_random_crop, base_seed=tf.constant([seed, epoch], tf.int64), max_frames=max_frames)
  batches = (pairs.map(crop, num_parallel_calls=tf.data.AUTOTUNE)
             .batch(batch_size, drop_remainder=True)
             .prefetch(tf.data.AUTOTUNE))
  return _deterministic(batches)


def process_train_batches(sources, *, global_batch_size: int, num_shards: int, process_index: int,
                          process_count: int, **kwargs):
  """Numpy iterator of this process's slices of the epoch's global batches.

  The global batch is the concatenation of the `num_shards` input shards' batches in shard order; process p runs
  shards [p * k, (p + 1) * k) with k = num_shards / process_count and yields their concatenation, which is its
  slice of the global batch. So the global batches depend on `num_shards`, never on the number of processes.
  `kwargs` go to `train_dataset` (max_frames, seed, epoch, shuffle buffers, skip_batches).
  """
  if num_shards <= 0 or num_shards % process_count or global_batch_size % num_shards:
    raise ValueError(f"data.num_input_shards={num_shards} must be a positive multiple of the process count "
                     f"({process_count}) that divides the global batch ({global_batch_size})")
  per_process = num_shards // process_count
  shards = [train_dataset(sources, batch_size=global_batch_size // num_shards, shard_index=shard,
                          num_shards=num_shards, **kwargs)
            for shard in range(process_index * per_process, (process_index + 1) * per_process)]
  if len(shards) == 1:
    return shards[0].as_numpy_iterator()
  zipped = tf.data.Dataset.zip(tuple(shards)).map(
      lambda *batches: {key: tf.concat([b[key] for b in batches], axis=0) for key in batches[0]})
  return zipped.prefetch(2).as_numpy_iterator()


def _eval_row(clip: dict, max_frames: int) -> dict:
  log_mel, frame_mask = _crop_and_pad(clip["log_mel"], 0, max_frames)
  return {"log_mel": log_mel, "frame_mask": frame_mask, "clip_id": clip["clip_id"], "valid": tf.constant(True),
          "num_frames": tf.shape(clip["log_mel"])[0]}


def _padding_row(max_frames: int) -> dict:
  return {"log_mel": tf.zeros((max_frames, features.N_MELS), tf.float32), "frame_mask": tf.zeros(max_frames, tf.bool),
          "clip_id": tf.constant(-1, tf.int32), "valid": tf.constant(False), "num_frames": tf.constant(0, tf.int32)}


def _numpy_batches(batches: tf.data.Dataset, split: str, max_frames: int):
  for batch in batches.as_numpy_iterator():
    cropped = batch["clip_id"][batch["num_frames"] > max_frames]
    if cropped.size:
      logging.warning("%s: clips %s are longer than max_frames=%d; only their first %d frames are used", split,
                      cropped.tolist(), max_frames, max_frames)
    yield {k: batch[k] for k in _EVAL_KEYS}


def eval_clip_batches(builder: tfds.core.DatasetBuilder, split: str, *, batch_size: int, max_frames: int,
                      process_index: int = 0, process_count: int = 1):
  """Iterator of numpy batches of this process's share of the clips of `split`, each clip exactly once.

  Batches hold `batch_size` rows: `log_mel` float32 (b, max_frames, 64) (the clip from frame 0, zero padded, or
  cropped to its first `max_frames` frames with a warning), `frame_mask` bool (b, max_frames), `clip_id` int32 (b,)
  and `valid` bool (b,); padding rows (valid False, clip_id -1, all zero) fill the last batches so that every
  process yields ceil(ceil(clips / process_count) / batch_size) batches.
  """
  clips_per_process = -(-_num_clips(builder, split) // process_count)
  num_batches = -(-clips_per_process // batch_size)
  shard = tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count)
  clips = builder.as_dataset(split=shard, shuffle_files=False, read_config=tfds.ReadConfig(try_autocache=False))
  rows = clips.map(functools.partial(_eval_row, max_frames=max_frames), num_parallel_calls=tf.data.AUTOTUNE)
  padding = tf.data.Dataset.from_tensors(_padding_row(max_frames)).repeat(
      num_batches * batch_size - _num_clips(builder, shard))
  batches = rows.concatenate(padding).batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return _numpy_batches(_deterministic(batches), split, max_frames)
