"""tf.data pipelines over prepared dataset builders (one record per clip): model-ready training batches of (clip,
caption) pairs, fixed-size evaluation batches of clips (whole, or in segments of at most `max_segment_frames`: the
rule is `clip_segments`), read in one pass, and model-ready batches of any caption list.

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
rows; zero padding and a mask when the clip is shorter; the extra sources' clips cropped shorter when
`extra_max_frames` asks), and batches them. Everything random is seeded from (seed,
epoch) (crops from (seed, epoch, clip_id, caption index) with stateless ops) and the pipeline runs with
`deterministic=True`, so an epoch's batches are reproducible, which is what makes `skip_batches` resume exact. Every
shard yields `steps_per_epoch` batches (a short shard is repeated) so that hosts stay in step; a process runs its
contiguous group of shards and concatenates their batches, so global batches do not depend on the process count.
"""

import collections
import functools
import json
import os
from typing import NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from data_pipelines import audio_forms, clip_builder, features
from data_pipelines import captions as caption_text


DEFAULT_PAIR_SHUFFLE_BUFFER = 2048
DEFAULT_CLIP_SHUFFLE_BUFFER = 4096
MIN_PADDED_FRAMES = 64  # Shortest padded length of an embedded clip (`padded_frames`).
# A cut clip's segments are weighed by their 10 s blocks (PaSST's segment, the DCASE 2025 rule: `clip_segments`); a
# block holding fewer than MIN_BLOCK_FRAMES frames (0.16 s, one PaSST patch column) does not count.
SEGMENT_BLOCK_FRAMES = 1000
MIN_BLOCK_FRAMES = 16


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


def train_max_frames(sources, max_frames: int, extra_max_frames: int) -> int:
  """The training batches' crop length (frames) for the (builder, split) `sources` (the first the main one, the
  others extra sources): `max_frames` (config.data.train_max_frames) when set, else the longest clip of the main
  source, or of the extra sources up to `extra_max_frames` (config.data.extra_train_max_frames; 0: their longest)
  when longer."""
  if max_frames:
    return max_frames
  longest = longest_clip(sources[:1])
  if len(sources) > 1:
    extra = longest_clip(sources[1:])
    longest = max(longest, min(extra, extra_max_frames) if extra_max_frames else extra)
  return longest


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


def _clip_to_pairs(clip: dict, form: audio_forms.AudioForm) -> tf.data.Dataset:
  captions = clip["captions"]
  pairs = tf.data.Dataset.from_tensor_slices(
    {"caption": captions, "caption_index": tf.range(tf.shape(captions)[0], dtype=tf.int32)}
  )
  return pairs.map(
    lambda pair: {**pair, form.name: clip[form.name], "clip_id": clip["clip_id"], "crop_frames": clip["crop_frames"]}
  )


def _random_crop(pair: dict, base_seed: tf.Tensor, max_frames: int, form: audio_forms.AudioForm) -> dict:
  """A uniform crop of the pair's `crop_frames` (at most `max_frames`), zero padded to `max_frames` frames."""
  pair_seed = tf.random.experimental.stateless_fold_in(
    tf.random.experimental.stateless_fold_in(base_seed, pair["clip_id"]), pair["caption_index"]
  )
  crop = pair["crop_frames"] * form.rows_per_frame
  excess = tf.maximum(tf.shape(pair[form.name])[0] - crop, 0)
  start = tf.random.stateless_uniform((), pair_seed, minval=0, maxval=excess + 1, dtype=tf.int32)
  stored = pair[form.name][start : start + crop]
  audio, mask = _pad_rows(_to_float32(stored, form), max_frames * form.rows_per_frame, form)
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


def _source_clips(
  sources, crop_frames: list, shard_index: int, num_shards: int, file_seed: int, choice_seed: int
) -> tf.data.Dataset:
  """The clips of input shard `shard_index` of every source, interleaved in a seeded random order in proportion to
  the sources' sizes; clip ids are offset so that they are unique over the sources (source order), and each clip
  carries its source's `crop_frames`."""
  datasets, counts, offset = [], [], 0
  for (builder, split), crop in zip(sources, crop_frames):
    shard = tfds.split_for_jax_process(split, process_index=shard_index, process_count=num_shards)
    clips = builder.as_dataset(
      split=shard, shuffle_files=True, read_config=tfds.ReadConfig(shuffle_seed=file_seed, try_autocache=False)
    )
    datasets.append(
      clips.map(
        lambda clip, offset=offset, crop=crop: {
          **clip,
          "clip_id": clip["clip_id"] + offset,
          "crop_frames": tf.constant(crop, tf.int32),
        }
      )
    )
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
  extra_max_frames: int = 0,
  shard_index: int = 0,
  num_shards: int = 1,
  shuffle_buffer: int = DEFAULT_PAIR_SHUFFLE_BUFFER,
  clip_shuffle_buffer: int = DEFAULT_CLIP_SHUFFLE_BUFFER,
  skip_batches: int = 0,
) -> tf.data.Dataset:
  """Epoch `epoch` of input shard `shard_index` (of `num_shards`), from batch `skip_batches` on.

  `sources` is a list of (builder, split) trained on together (clip ids offset to stay unique). `batch_size` is
  the shard's batch (global // num_shards); every source holds the same audio form (else a ValueError naming two
  builders' folders). A clip of the first source is cropped to `max_frames` frames, one of the other (extra)
  sources to `extra_max_frames` frames when that is shorter (config.data.extra_train_max_frames; 0: `max_frames`),
  and padded to `max_frames`. Batches are dicts of `log_mel` float32 (b, max_frames, 64) and `frame_mask` bool
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
  extra = min(extra_max_frames, max_frames) if extra_max_frames else max_frames
  crops = [max_frames] + [extra] * (len(sources) - 1)
  clips = _source_clips(sources, crops, shard_index, num_shards, file_seed, choice_seed + shard_index)
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
  `kwargs` go to `train_dataset` (max_frames, extra_max_frames, seed, epoch, shuffle buffers, skip_batches).
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


def max_segment_frames(seconds: float, form: audio_forms.AudioForm) -> int:
  """Frames of the longest piece of a clip the audio tower embeds at once (`config.eval.max_segment_s`): the frames
  of a clip of `seconds` in `form` (30 s: 3001 log-mel frames, 3000 waveform frames, so that a 30 s clip stays
  whole in either form)."""
  samples = round(seconds * features.SAMPLE_RATE)
  frames = form.frames(samples) if form.rows_per_frame > 1 else features.num_frames(samples)
  if frames < MIN_PADDED_FRAMES:
    raise ValueError(
      f"config.eval.max_segment_s={seconds}: segments must hold at least {MIN_PADDED_FRAMES} frames "
      f"({MIN_PADDED_FRAMES / 100} s)"
    )
  return frames


def segment_weight(frames: np.ndarray) -> np.ndarray:
  """The weight of a segment of `frames` frames in its clip's mean (`clip_segments`): its 10 s blocks
  (SEGMENT_BLOCK_FRAMES) holding at least MIN_BLOCK_FRAMES frames."""
  return (np.asarray(frames, np.int64) + SEGMENT_BLOCK_FRAMES - MIN_BLOCK_FRAMES) // SEGMENT_BLOCK_FRAMES


def clip_segments(num_frames: int, max_frames: int) -> list[tuple[int, int, int]]:
  """(first frame, frames, weight) of each segment a clip of `num_frames` frames is embedded in, `max_frames` the
  longest segment (`max_segment_frames`). A clip of at most `max_frames` frames is one segment, whole (weight 1).
  A longer clip is cut from its start into consecutive segments of `max_frames` frames, the last holding the rest;
  each weighs `segment_weight` of its frames, and a last segment of weight 0 (under MIN_BLOCK_FRAMES frames past
  its last full block) is left out. `atr_jax.evaluation` combines a clip's segments by these weights."""
  if num_frames <= max_frames:
    return [(0, int(num_frames), 1)]
  starts = range(0, int(num_frames), max_frames)
  lengths = [min(max_frames, int(num_frames) - start) for start in starts]
  return [(s, n, int(w)) for s, n, w in zip(starts, lengths, segment_weight(lengths)) if w > 0]


def segment_counts(num_frames: np.ndarray, max_frames: int) -> np.ndarray:
  """`len(clip_segments(n, max_frames))` for every n of `num_frames` (int64)."""
  num_frames = np.asarray(num_frames, np.int64)
  pieces = -(-num_frames // max_frames)
  tail = num_frames - (pieces - 1) * max_frames
  return np.where(num_frames <= max_frames, 1, pieces - (segment_weight(tail) == 0)).astype(np.int64)


def segment_buckets(num_frames: np.ndarray, max_frames: int) -> np.ndarray:
  """The padded length (frames) of every segment of each clip of `num_frames`: `padded_frames` of a whole clip,
  `padded_frames(max_frames)` for every segment of a cut one (int64)."""
  lengths = np.minimum(np.asarray(num_frames, np.int64), max_frames)
  padded = {n: padded_frames(int(n)) for n in np.unique(lengths).tolist()}
  return np.array([padded[n] for n in lengths.tolist()], np.int64).reshape(lengths.shape)


def segment_batches(
  stream,
  num_frames: np.ndarray,
  form: audio_forms.AudioForm,
  *,
  batch_size: int,
  max_segment_frames: int,
  process_index: int,
  process_count: int,
):
  """Iterator of numpy batches of this process's share of the segments (`clip_segments`) of a set of clips, read
  in one pass: `stream` yields (clip id, stored array) for every clip of the set once, in an order every process
  sees the same; `num_frames` holds each clip id's frames (`AudioForm.frames` of its stored length).

  The segments of a clip all go to one padded length (`segment_buckets`), and the clips of each length are dealt to
  the P processes in turn, in stream order: the i-th clip of a length goes to process i mod P. A process holds the
  segments it has read in a buffer per length, and a batch of a length leaves once every process has read its rows
  of it (which every process can tell from the clip ids of the stream), so every process yields the same shapes in
  the same order, and it holds at most about a batch per length (at most `batch_size` x the padded length of
  `max_segment_frames` rows each), never the split. A batch holds `batch_size` rows: the audio float32
  (b, padded * rows_per_frame[, 64]) zero padded with its mask (the form's `name` and `mask`, as in training),
  `clip_id` int32 (b,), `valid` bool (b,) and `weight` float32 (b,) (the segment's weight in its clip's mean);
  padding rows (valid False, clip id -1, weight 0) complete a length's last batch.
  """
  num_frames = np.asarray(num_frames, np.int64)
  counts = segment_counts(num_frames, max_segment_frames)
  lengths, bucket_of = np.unique(segment_buckets(num_frames, max_segment_frames), return_inverse=True)
  clips_per_bucket = np.bincount(bucket_of, minlength=len(lengths))
  processes = np.arange(process_count)[:, None]
  clips_due = (clips_per_bucket[None, :] - processes + process_count - 1) // process_count  # [process, bucket]
  clips_read = np.zeros_like(clips_due)
  rows_read = np.zeros_like(clips_due)
  emitted = np.zeros(len(lengths), np.int64)
  buffers = [collections.deque() for _ in lengths]
  seen = np.zeros(len(num_frames), bool)

  def ready(bucket: int) -> bool:
    first = emitted[bucket] * batch_size
    rows = rows_read[:, bucket]
    done = (rows >= first + batch_size) | (clips_read[:, bucket] == clips_due[:, bucket])
    return bool(done.all() and (rows > first).any())

  def batch(bucket: int) -> dict:
    rows = int(lengths[bucket]) * form.rows_per_frame
    count = int(np.clip(rows_read[process_index, bucket] - emitted[bucket] * batch_size, 0, batch_size))
    out = {
      form.name: np.zeros((batch_size, rows, *form.row_shape), np.float32),
      form.mask: np.zeros((batch_size, rows), bool),
      "clip_id": np.full(batch_size, -1, np.int32),
      "valid": np.zeros(batch_size, bool),
      "weight": np.zeros(batch_size, np.float32),
    }
    for row in range(count):
      clip_id, audio, weight = buffers[bucket].popleft()
      out[form.name][row, : len(audio)] = form.to_float32(audio)
      out[form.mask][row, : len(audio)] = True
      out["clip_id"][row], out["valid"][row], out["weight"][row] = clip_id, True, weight
    emitted[bucket] += 1
    return out

  for clip_id, stored in stream:
    clip_id = int(clip_id)
    if not 0 <= clip_id < len(num_frames) or seen[clip_id]:
      raise ValueError(f"clip id {clip_id} is outside [0, {len(num_frames)}) or comes twice")
    seen[clip_id] = True
    bucket = bucket_of[clip_id]
    owner = int(clips_read[:, bucket].sum()) % process_count
    clips_read[owner, bucket] += 1
    rows_read[owner, bucket] += counts[clip_id]
    if owner == process_index:
      if form.frames(len(stored)) != num_frames[clip_id]:
        raise ValueError(
          f"clip {clip_id} holds {form.frames(len(stored))} frames, its table says {num_frames[clip_id]}: "
          "prepare the dataset again"
        )
      for start, frames, weight in clip_segments(int(num_frames[clip_id]), max_segment_frames):
        rows = slice(start * form.rows_per_frame, (start + frames) * form.rows_per_frame)
        buffers[bucket].append((clip_id, stored[rows], weight))
    while ready(bucket):
      yield batch(bucket)
  if not seen.all():
    raise ValueError(f"the records hold {int(seen.sum())} of the {len(num_frames)} clips of their table")


def eval_clip_batches(
  builder: tfds.core.DatasetBuilder,
  split: str,
  *,
  batch_size: int,
  max_segment_frames: int,
  process_index: int = 0,
  process_count: int = 1,
):
  """Iterator of numpy batches of this process's share of the segments of the clips of `split` (every clip whole
  when it holds at most `max_segment_frames` frames, else in segments: `clip_segments`), in `segment_batches`'
  shapes and order: the records are read once, in one pass over the split (each process reads them all and keeps
  its share), and the batches hold the builder's audio form."""
  form = audio_form_of(builder)
  records = builder.as_dataset(split=split, shuffle_files=False, read_config=tfds.ReadConfig(try_autocache=False))
  stream = records.map(lambda clip: (clip["clip_id"], clip[form.name]), num_parallel_calls=tf.data.AUTOTUNE)
  return segment_batches(
    _deterministic(stream.prefetch(tf.data.AUTOTUNE)).as_numpy_iterator(),
    eval_clip_frames(builder, split),
    form,
    batch_size=batch_size,
    max_segment_frames=max_segment_frames,
    process_index=process_index,
    process_count=process_count,
  )
