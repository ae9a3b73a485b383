"""tf.data pipelines over prepared dataset builders (one record per clip): model-ready training batches of (clip,
caption) pairs, fixed-size evaluation batches of whole clips, and model-ready batches of any caption list.

Captions become token ids here, through one `captions.CaptionEncoder` (cleaning + tokenizer), for training,
evaluation and retrieval alike.

The audio of a batch is what the records hold, in their audio form (`audio_forms`, read from the builder's features:
`audio_form_of`), as float32: the log-mel (b, rows, 64) with `frame_mask` (b, rows), or the waveform (b, rows) (int16
/ 32767) with `sample_mask` (b, rows), a row per 10 ms frame for the log-mel and per sample (320 a frame) for the
waveform. Lengths the caller chooses or reads (`max_frames`, `longest_clip`, `eval_clip_frames`, `padded_frames`)
are in 10 ms frames for both forms; sources of different forms cannot be trained on together.

Training: each input shard reads its even share of the clips (`tfds.split_for_jax_process`) of every source (one or more
(builder, split) trained on together), shuffles them, flattens them to (clip, caption) pairs, shuffles the pairs, gives
each pair an independent uniform crop of `max_frames` frames (`max_frames * rows_per_frame` rows, the start drawn in
rows; zero padding and a mask when the clip is shorter), and batches them. Everything random is seeded from (seed,
epoch) (crops from (seed, epoch, clip_id, caption index) with stateless ops) and the pipeline runs with
`deterministic=True`, so an epoch's batches are reproducible, which is what makes `skip_batches` resume exact. Every
shard yields `steps_per_epoch` batches (a short shard is repeated) so that hosts stay in step; a process runs its
contiguous group of shards and concatenates their batches, so global batches do not depend on the process count.
"""

import functools
import json
import os
from typing import NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from data_pipelines import audio_forms, clip_builder
from data_pipelines import captions as caption_text


DEFAULT_PAIR_SHUFFLE_BUFFER = 2048
DEFAULT_CLIP_SHUFFLE_BUFFER = 4096
MIN_PADDED_FRAMES = 64  # Shortest padded length of an embedded clip (`padded_frames`).


def leave_accelerators_to_jax() -> None:
  """Hides the GPUs from TensorFlow, so that tf.data neither allocates GPU memory nor initialises CUDA beside JAX.
  The training, evaluation and retrieval entry points call it before their first tf.data pipeline."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TensorFlow's devices are already initialised; their choice stands.
    logging.warning("TensorFlow already initialised: could not hide the GPUs from tf.data")


def num_clips(builder: tfds.core.DatasetBuilder, split) -> int:
  return builder.info.splits[split].num_examples


def audio_form_of(builder: tfds.core.DatasetBuilder) -> audio_forms.AudioForm:
  """The audio form of `builder`'s records: the one whose feature its records hold."""
  names = [name for name in audio_forms.AUDIO_FORMS if name in builder.info.features]
  if len(names) != 1:
    raise ValueError(
      f"{builder.data_dir}: the records hold {sorted(builder.info.features)}, not exactly one audio form of "
      f"{sorted(audio_forms.AUDIO_FORMS)}"
    )
  return audio_forms.AUDIO_FORMS[names[0]]


def _sources_form(sources) -> audio_forms.AudioForm:
  """The audio form shared by the (builder, split) `sources`; a ValueError naming two builders' folders that differ."""
  (first, _), *others = sources
  form = audio_form_of(first)
  for builder, _ in others:
    other = audio_form_of(builder)
    if other != form:
      raise ValueError(
        f"training sources of different audio forms cannot be mixed: {first.data_dir} holds {form.name}, "
        f"{builder.data_dir} holds {other.name} (prepare every source with the same config.data.audio_feature)"
      )
  return form


class _ClipTable(NamedTuple):
  captions: tuple[tuple[str, ...], ...]  # Per clip id.
  file_names: tuple[str, ...]
  num_frames: tuple[int, ...]  # 10 ms frames.


@functools.cache
def _clip_table(builder: tfds.core.DatasetBuilder, split: str) -> _ClipTable:
  """Captions, file name and frame count (of the stored length) per clip id of `split`, from the table the
  preparation wrote beside the records (`clip_builder.CLIPS_FILE`; no record is read), once per builder and split."""
  form = audio_form_of(builder)
  path = os.path.join(builder.data_dir, clip_builder.CLIPS_FILE)
  with open(path, encoding="utf-8") as f:
    table = json.load(f)
  if split not in table:
    raise ValueError(f"{path}: no split {split!r} (it has {sorted(table)})")
  table = table[split]
  if len(table["file_names"]) != num_clips(builder, split):
    raise ValueError(
      f"{path}: {len(table['file_names'])} clips in split {split!r}, the records hold "
      f"{num_clips(builder, split)}: prepare the dataset again"
    )
  if form.length_key not in table:
    raise ValueError(f"{path}: no {form.length_key!r} in split {split!r} for {form.name} records")
  return _ClipTable(
    captions=tuple(tuple(clip_captions) for clip_captions in table["captions"]),
    file_names=tuple(table["file_names"]),
    num_frames=tuple(form.frames(length) for length in table[form.length_key]),
  )


def train_pairs_per_epoch(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """Number of (clip, caption) pairs of `split`."""
  return sum(len(captions) for captions in _clip_table(builder, split).captions)


def steps_per_epoch(sources, global_batch: int) -> int:
  """Global batches per epoch over the (builder, split) `sources`: all their pairs // global_batch."""
  pairs = sum(train_pairs_per_epoch(builder, split) for builder, split in sources)
  steps = pairs // global_batch
  if steps == 0:
    names = ", ".join(f"{builder.name}:{split}" for builder, split in sources)
    raise ValueError(f"{names} hold {pairs} (clip, caption) pairs, fewer than the global batch {global_batch}")
  return steps


def longest_clip(sources) -> int:
  """Frames (10 ms) of the longest clip of the (builder, split) `sources` (of one audio form)."""
  _sources_form(sources)
  return max(max(_clip_table(builder, split).num_frames) for builder, split in sources)


def eval_captions(builder: tfds.core.DatasetBuilder, split: str) -> tuple[list[str], np.ndarray, list[str]]:
  """All captions of `split` (ordered by clip id), the clip id of each (int32), and the file name per clip id."""
  table = _clip_table(builder, split)
  captions, file_names = table.captions, table.file_names
  flat = [caption for clip_captions in captions for caption in clip_captions]
  clip_ids = np.repeat(np.arange(len(captions), dtype=np.int32), [len(c) for c in captions])
  return flat, clip_ids, list(file_names)


def _stream_seeds(seed: int, epoch: int, count: int) -> list[int]:
  """`count` independent 63-bit seeds derived from (seed, epoch)."""
  return [int(s) >> 1 for s in np.random.SeedSequence([seed, epoch]).generate_state(count, dtype=np.uint64)]


def _to_float32(stored: tf.Tensor, form: audio_forms.AudioForm) -> tf.Tensor:
  """`AudioForm.to_float32` in TensorFlow: the same float32 values."""
  values = tf.cast(stored, tf.float32)
  return values if form.scale == 1 else values / float(form.scale)


def _pad_rows(values: tf.Tensor, rows: int, form: audio_forms.AudioForm) -> tuple[tf.Tensor, tf.Tensor]:
  """float32 `values` (at most `rows` rows) zero padded to `rows` rows; mask True on the real rows."""
  length = tf.shape(values)[0]
  padded = tf.pad(values, [[0, rows - length]] + [[0, 0]] * len(form.row_shape))
  return tf.ensure_shape(padded, (rows, *form.row_shape)), tf.range(rows) < length


def _crop_and_pad(stored: tf.Tensor, start: tf.Tensor, rows: int, form: audio_forms.AudioForm):
  """`rows` rows of `stored` from row `start` as float32, zero padded; mask True on real rows."""
  return _pad_rows(_to_float32(stored[start : start + rows], form), rows, form)


def _clip_to_pairs(clip: dict, form: audio_forms.AudioForm) -> tf.data.Dataset:
  captions = clip["captions"]
  pairs = tf.data.Dataset.from_tensor_slices(
    {"caption": captions, "caption_index": tf.range(tf.shape(captions)[0], dtype=tf.int32)}
  )
  return pairs.map(lambda pair: {**pair, form.name: clip[form.name], "clip_id": clip["clip_id"]})


def _random_crop(pair: dict, base_seed: tf.Tensor, max_frames: int, form: audio_forms.AudioForm) -> dict:
  pair_seed = tf.random.experimental.stateless_fold_in(
    tf.random.experimental.stateless_fold_in(base_seed, pair["clip_id"]), pair["caption_index"]
  )
  rows = max_frames * form.rows_per_frame
  excess = tf.maximum(tf.shape(pair[form.name])[0] - rows, 0)
  start = tf.random.stateless_uniform((), pair_seed, minval=0, maxval=excess + 1, dtype=tf.int32)
  audio, mask = _crop_and_pad(pair[form.name], start, rows, form)
  return {
    form.name: audio,
    form.mask: mask,
    "caption": pair["caption"],
    "clip_id": pair["clip_id"],
    "caption_index": pair["caption_index"],
  }


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
    clips = builder.as_dataset(
      split=shard, shuffle_files=True, read_config=tfds.ReadConfig(shuffle_seed=file_seed, try_autocache=False)
    )
    datasets.append(clips.map(lambda clip, offset=offset: {**clip, "clip_id": clip["clip_id"] + offset}))
    counts.append(num_clips(builder, shard))
    offset += num_clips(builder, split)
  if len(datasets) == 1:
    return datasets[0]
  choices = np.random.default_rng(choice_seed).permutation(np.repeat(np.arange(len(counts), dtype=np.int64), counts))
  return tf.data.Dataset.choose_from_datasets(datasets, tf.data.Dataset.from_tensor_slices(choices))


def train_dataset(
  sources,
  *,
  batch_size: int,
  max_frames: int,
  seed: int,
  epoch: int,
  shard_index: int = 0,
  num_shards: int = 1,
  shuffle_buffer: int = DEFAULT_PAIR_SHUFFLE_BUFFER,
  clip_shuffle_buffer: int = DEFAULT_CLIP_SHUFFLE_BUFFER,
  skip_batches: int = 0,
) -> tf.data.Dataset:
  """Epoch `epoch` of input shard `shard_index` (of `num_shards`), from batch `skip_batches` on.

  `sources` is a list of (builder, split) trained on together (clip ids offset to stay unique). `batch_size` is
  the shard's batch (global // num_shards); every source holds the same audio form (else a ValueError naming two
  builders' folders). Batches are dicts of `log_mel` float32 (b, max_frames, 64) and `frame_mask` bool
  (b, max_frames), or `waveform` float32 (b, max_frames * 320) and `sample_mask` bool (b, max_frames * 320) (the
  form's `name` and `mask`), `caption` string (b,), `clip_id` int32 (b,) and `caption_index` int32 (b,) (the
  caption's position among its clip's captions: with clip_id, the pair's identity); there are
  `steps_per_epoch(sources, batch_size * num_shards) - skip_batches` of them. Skipped batches are still read and
  shuffled (to reproduce the order) but not cropped.
  """
  steps = steps_per_epoch(sources, batch_size * num_shards)
  if not 0 <= skip_batches <= steps:
    raise ValueError(f"skip_batches={skip_batches} is outside [0, {steps}] (the epoch's batches)")
  form = _sources_form(sources)
  file_seed, clip_seed, pair_seed, choice_seed = _stream_seeds(seed, epoch, 4)
  clips = _source_clips(sources, shard_index, num_shards, file_seed, choice_seed + shard_index)
  pairs = (
    clips.shuffle(clip_shuffle_buffer, seed=clip_seed)
    .flat_map(functools.partial(_clip_to_pairs, form=form))
    .shuffle(shuffle_buffer, seed=pair_seed)
    .repeat()  # A shard with fewer pairs than steps * batch_size goes round again.
    # Stop at the epoch's last pair: reading past it would make `repeat` refill the shuffle buffers.
    .take(steps * batch_size)
    .skip(skip_batches * batch_size)
  )
  crop = functools.partial(
    _random_crop, base_seed=tf.constant([seed, epoch], tf.int64), max_frames=max_frames, form=form
  )
  batches = (
    pairs.map(crop, num_parallel_calls=tf.data.AUTOTUNE)
    .batch(batch_size, drop_remainder=True)
    .prefetch(tf.data.AUTOTUNE)
  )
  return _deterministic(batches)


def process_train_batches(
  sources,
  *,
  global_batch_size: int,
  num_shards: int,
  process_index: int,
  process_count: int,
  encode_captions: caption_text.CaptionEncoder,
  **kwargs,
):
  """Iterator of this process's model-ready numpy slices of the epoch's global batches: `train_dataset`'s batches
  with `caption` replaced by `input_ids` and `attention_mask` (int32 (b, max_len)) from `encode_captions`.

  The global batch is the concatenation of the `num_shards` input shards' batches in shard order; process p runs
  shards [p * k, (p + 1) * k) with k = num_shards / process_count and yields their concatenation, which is its
  slice of the global batch. So the global batches depend on `num_shards`, never on the number of processes.
  `kwargs` go to `train_dataset` (max_frames, seed, epoch, shuffle buffers, skip_batches).
  """
  if num_shards <= 0 or num_shards % process_count or global_batch_size % num_shards:
    raise ValueError(
      f"data.num_input_shards={num_shards} must be a positive multiple of the process count "
      f"({process_count}) that divides the global batch ({global_batch_size})"
    )
  per_process = num_shards // process_count
  shards = [
    train_dataset(
      sources, batch_size=global_batch_size // num_shards, shard_index=shard, num_shards=num_shards, **kwargs
    )
    for shard in range(process_index * per_process, (process_index + 1) * per_process)
  ]
  if len(shards) == 1:
    batches = shards[0]
  else:
    batches = (
      tf.data.Dataset.zip(tuple(shards))
      .map(lambda *parts: {key: tf.concat([part[key] for part in parts], axis=0) for key in parts[0]})
      .prefetch(2)
    )
  return _with_tokens(batches.as_numpy_iterator(), encode_captions)


def _with_tokens(batches, encode_captions: caption_text.CaptionEncoder):
  for batch in batches:
    yield {**{k: v for k, v in batch.items() if k != "caption"}, **encode_captions(batch["caption"])}


def caption_batches(
  captions: list,
  encode_captions: caption_text.CaptionEncoder,
  *,
  global_batch_size: int,
  process_index: int,
  process_count: int,
):
  """(this process's model-ready slice of a global batch, number of real captions in that global batch) for
  consecutive global batches of `captions` (the last one completed with empty captions, which the caller drops)."""
  local_batch_size = global_batch_size // process_count
  for start in range(0, len(captions), global_batch_size):
    chunk = list(captions[start : start + global_batch_size])
    lo = process_index * local_batch_size
    local = (chunk + [""] * (global_batch_size - len(chunk)))[lo : lo + local_batch_size]
    yield encode_captions(local), len(chunk)


def padded_frames(num_frames: int) -> int:
  """The length a clip of `num_frames` frames is padded to for embedding (evaluation, validation and retrieval alike):
  the smallest m * 2**k >= num_frames with m in 4..7, at least MIN_PADDED_FRAMES. Four lengths per octave bound the
  compilations and keep the padding under 25 % (and under MIN_PADDED_FRAMES frames for short clips)."""
  if num_frames < 1:
    raise ValueError(f"num_frames={num_frames}: a clip has at least one frame")
  octave = 1 << max(int(num_frames - 1).bit_length() - 3, 0)  # 2**k with 4 * 2**k <= num_frames - 1 < 8 * 2**k.
  return max(-(-num_frames // octave) * octave, MIN_PADDED_FRAMES)


def eval_clip_frames(builder: tfds.core.DatasetBuilder, split: str) -> np.ndarray:
  """Frames (10 ms; ceil(samples / 320) for a waveform) of every clip of `split`, by clip id (int64)."""
  return np.asarray(_clip_table(builder, split).num_frames, np.int64)


def _bucket_rows(clip: dict, feature, rows: int, form: audio_forms.AudioForm) -> dict:
  audio, mask = _pad_rows(_to_float32(feature.decode_example(clip[form.name]), form), rows, form)
  return {
    form.name: audio,
    form.mask: mask,
    "clip_id": clip["clip_id"],
    "valid": tf.constant(True),
  }


def _padding_rows(rows: int, count: int, form: audio_forms.AudioForm) -> tf.data.Dataset:
  row = {
    form.name: tf.zeros((rows, *form.row_shape), tf.float32),
    form.mask: tf.zeros(rows, tf.bool),
    "clip_id": tf.constant(-1, tf.int32),
    "valid": tf.constant(False),
  }
  return tf.data.Dataset.from_tensors(row).repeat(count)


def eval_clip_batches(
  builder: tfds.core.DatasetBuilder,
  split: str,
  *,
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  max_frames: int | None = None,
):
  """Iterator of numpy batches of this process's share of the clips of `split`: every clip exactly once and whole.

  Clips are grouped by `padded_frames` of their length (a few lengths per split, read from the prepared data); the
  groups come in increasing length, and in each group process p takes the clips p, p + P, ... (by clip id) of the P
  processes. A batch holds `batch_size` rows of one group: `log_mel` float32 (b, padded, 64) zero padded and
  `frame_mask` bool (b, padded), or `waveform` float32 (b, padded * 320) and `sample_mask` bool (b, padded * 320) (the
  builder's audio form, as in training), `clip_id` int32 (b,) and `valid` bool (b,); padding rows (valid False, clip id
  -1) complete each group's last batch, so that every process yields batches of the same shapes in the same order.
  `max_frames`: the longest clip the audio tower supports (None: any); a longer clip is a ValueError naming it.
  """
  lengths = eval_clip_frames(builder, split)
  if max_frames is not None and lengths.size and lengths.max() > max_frames:
    too_long = np.flatnonzero(lengths > max_frames)
    names = [_clip_table(builder, split).file_names[i] for i in too_long[:5]]
    raise ValueError(
      f"{builder.name} split {split}: {too_long.size} clips are longer than the {max_frames} frames "
      f"the audio tower supports, e.g. {names} ({lengths[too_long[0]]} frames); they cannot be "
      "embedded whole"
    )
  buckets = np.array([padded_frames(int(n)) for n in lengths], np.int64)
  form = audio_form_of(builder)
  feature = builder.info.features[form.name]
  groups = []
  for frames in sorted(set(buckets.tolist())):
    ids = np.flatnonzero(buckets == frames)
    mine = np.zeros(len(lengths), bool)
    mine[ids[process_index::process_count]] = True
    rows = int(mine.sum())
    num_batches = -(-(-(-ids.size // process_count)) // batch_size)
    clips = builder.as_dataset(
      split=split,
      shuffle_files=False,
      decoders={form.name: tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(try_autocache=False),
    )
    group = (
      clips.filter(lambda clip, mine=tf.constant(mine): tf.gather(mine, clip["clip_id"]))
      .map(
        functools.partial(_bucket_rows, feature=feature, rows=frames * form.rows_per_frame, form=form),
        num_parallel_calls=tf.data.AUTOTUNE,
      )
      .concatenate(_padding_rows(frames * form.rows_per_frame, num_batches * batch_size - rows, form))
      .batch(batch_size, drop_remainder=True)
    )
    groups.append(group)
  batches = functools.reduce(tf.data.Dataset.concatenate, groups).prefetch(tf.data.AUTOTUNE)
  return _deterministic(batches).as_numpy_iterator()
