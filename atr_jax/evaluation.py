"""Embedding a whole split (every clip and caption), any list of clips, or any caption list, for retrieval metrics,
submissions, retrieval indexes, zero-shot classification and teacher folders: every path that embeds audio goes
through `embed_segment_batches`, so every clip is embedded by one rule.

The rule, for every audio tower: a clip of at most `config.eval.max_segment_s` is embedded once and whole. A longer
clip is cut from its start into consecutive segments of that length (the last holding the rest;
`input_pipeline.clip_segments`), each embedded alone by the audio tower, and the clip's tower output is the mean of
its segments' tower outputs weighted by their 10 s blocks (a block counts when it holds at least 0.16 s; a last
segment without one is left out), computed in float64; then the projection head and L2 normalisation, as for a
whole clip. So with the default 30 s:
- CNN14 / ResNet38: a clip of up to 30 s is pooled whole (max + mean over time), as in training on Clotho's 30 s
  clips; a longer clip is the block-weighted mean of the pooled 2048-d outputs of its 30 s segments.
- PaSST: the tower itself averages the 10 s segments of its input that hold audio (SPEC 11); 30 s being a multiple
  of 10 s, a cut clip's segments keep the 10 s grid and the block weights make the result the mean over all its
  10 s segments (the DCASE 2025 baseline's rule, SPEC 11b), with the front end computed per 30 s segment.

Every batch has a fixed size (padding rows masked), clips are padded to a few lengths (`input_pipeline.padded_frames`,
at most that of `max_segment_s`), so the jitted functions compile a few times and the tower never sees a longer
input, and every process runs the same steps. A clip's embedding never depends on its batch-mates or on its
padding: padding frames are masked inside the audio tower.
"""

import dataclasses

import jax
import numpy as np
from absl import logging

from atr_jax import sharding
from atr_jax.models.dual_encoder import l2_normalize
from atr_jax.models.registry import audio_inputs
from data_pipelines import input_pipeline
from data_pipelines.captions import CaptionEncoder


@dataclasses.dataclass
class SplitEmbeddings:
  audio: np.ndarray  # [N_a, D], row i = clip_id i.
  text: np.ndarray  # [N_t, D].
  caption_clip_ids: np.ndarray  # [N_t] int32: the clip of each caption.
  captions: list
  file_names: list  # Indexed by clip_id.


class Embedder:
  """Jitted, mesh-sharded embedding of audio and caption batches. `variable_shardings`: the shardings of the
  model variables it will be given ({'params', 'batch_stats'} trees, e.g. FSDP ones), or one sharding for all
  (default: replicated over the mesh). `max_segment_s` (config.eval.max_segment_s): the longest audio the tower
  embeds at once (the module docstring's rule)."""

  def __init__(self, model, mesh, variable_shardings=None, *, max_segment_s: float):
    self._mesh = mesh
    self.max_segment_s = max_segment_s
    batch = sharding.batch_sharding(mesh)
    variables = sharding.replicated(mesh) if variable_shardings is None else variable_shardings

    def tower(variables, audio, audio_mask):
      return model.apply(variables, audio, audio_mask, method=_tower_outputs)

    def project(variables, outputs):
      return model.apply(variables, outputs, method=_projected_audio)

    def embed_text(variables, input_ids, attention_mask):
      return model.apply(variables, input_ids, attention_mask, train=False, method="embed_text")

    self._tower = jax.jit(tower, in_shardings=(variables, batch, batch), out_shardings=batch)
    self._project = jax.jit(project, in_shardings=(variables, batch), out_shardings=batch)
    self._text = jax.jit(embed_text, in_shardings=(variables, batch, batch), out_shardings=batch)

  def tower(self, variables, local_batch: dict) -> np.ndarray:
    """The audio tower's outputs (global batch, D_tower) float32 for a batch's audio (`registry.audio_inputs`:
    log-mels or waveforms, with their mask), in eval mode."""
    audio, audio_mask = audio_inputs(local_batch)
    batch = sharding.global_batch({"audio": audio, "audio_mask": audio_mask}, self._mesh)
    return sharding.to_host(self._tower(variables, batch["audio"], batch["audio_mask"]))

  def project(self, variables, local_outputs: np.ndarray) -> np.ndarray:
    """Unit embeddings (global batch, D) of this process's slice of a global batch of tower outputs."""
    outputs = sharding.global_batch({"outputs": local_outputs}, self._mesh)["outputs"]
    return sharding.to_host(self._project(variables, outputs))

  def text(self, variables, local_batch: dict) -> np.ndarray:
    batch = sharding.global_batch(local_batch, self._mesh)
    return sharding.to_host(self._text(variables, batch["input_ids"], batch["attention_mask"]))


def _tower_outputs(model, audio, audio_mask):
  """`DualEncoder.embed_audio`'s first half: the audio tower in eval mode."""
  return model.audio(audio, audio_mask, False)


def _projected_audio(model, outputs):
  """`DualEncoder.embed_audio`'s second half: the audio head and L2 normalisation."""
  return l2_normalize(model.audio_head(outputs))


def embed_segment_batches(
  embedder: Embedder, variables, batches, segment_counts: np.ndarray, *, global_batch_size: int
) -> np.ndarray:
  """Unit embeddings [N, D] (identical on every process) of the N clips whose segments `batches` hold
  (`input_pipeline.segment_batches`' local batches, with their `clip_id`, `valid` and `weight` rows), clip i in
  `segment_counts[i]` segments: the module docstring's rule. A clip's tower outputs are combined as soon as its last
  segment is embedded, and the combined outputs go through the head in global batches of `global_batch_size`, so
  memory holds a batch of outputs and the clips whose segments straddle batches, besides the result."""
  local_size = global_batch_size // jax.process_count()
  first_row = jax.process_index() * local_size
  embeddings, done = None, np.zeros(len(segment_counts), bool)
  pending = {}  # Clip id -> [weighted sum of its segments' outputs (float64), sum of weights, segments left].
  ready_ids, ready_outputs = [], []

  def project(count: int) -> None:
    nonlocal embeddings, ready_ids, ready_outputs
    outputs = np.zeros((global_batch_size, ready_outputs[0].shape[0]), np.float32)
    outputs[:count] = ready_outputs[:count]
    projected = embedder.project(variables, outputs[first_row : first_row + local_size])
    if embeddings is None:
      embeddings = np.zeros((len(segment_counts), projected.shape[1]), np.float32)
    embeddings[ready_ids[:count]] = projected[:count]
    done[ready_ids[:count]] = True
    ready_ids, ready_outputs = ready_ids[count:], ready_outputs[count:]

  for local in batches:
    outputs = embedder.tower(variables, local)
    clip_ids, valid, weights = (_gather_rows(local[key]) for key in ("clip_id", "valid", "weight"))
    for row in np.flatnonzero(valid):
      clip_id = int(clip_ids[row])
      if segment_counts[clip_id] == 1:
        ready_ids.append(clip_id)
        ready_outputs.append(outputs[row])
        continue
      total = pending.setdefault(clip_id, [0.0, 0.0, segment_counts[clip_id]])
      total[0] = total[0] + float(weights[row]) * outputs[row].astype(np.float64)
      total[1] += float(weights[row])
      total[2] -= 1
      if total[2] == 0:
        ready_ids.append(clip_id)
        ready_outputs.append((pending.pop(clip_id)[0] / total[1]).astype(np.float32))
    while len(ready_ids) >= global_batch_size:
      project(global_batch_size)
  if ready_ids:
    project(len(ready_ids))
  if embeddings is None or pending or not done.all():
    raise ValueError(f"the segment batches embedded {int(done.sum())} of the {len(segment_counts)} clips")
  return embeddings


def embed_split(
  embedder: Embedder,
  variables,
  builder,
  split: str,
  *,
  encode_captions: CaptionEncoder,
  global_batch_size: int,
  max_frames: int | None,
) -> SplitEmbeddings:
  """Embeddings of every clip and caption of `split` (identical on every process), the split's records read once;
  `max_frames` is the longest input the audio tower takes (None: any): the segments' padded length must not exceed
  it."""
  local_batch_size = sharding.check_global_batch(global_batch_size, "eval.batch_size")
  captions, caption_clip_ids, file_names = input_pipeline.eval_captions(builder, split)
  segment_frames = _max_segment_frames(embedder, input_pipeline.audio_form_of(builder), max_frames)
  batches = input_pipeline.eval_clip_batches(
    builder,
    split,
    batch_size=local_batch_size,
    max_segment_frames=segment_frames,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  counts = input_pipeline.segment_counts(input_pipeline.eval_clip_frames(builder, split), segment_frames)
  audio = embed_segment_batches(embedder, variables, batches, counts, global_batch_size=global_batch_size)
  text = embed_captions(
    embedder, variables, captions, encode_captions=encode_captions, global_batch_size=global_batch_size
  )
  logging.info("Embedded split %s: %d clips, %d captions", split, audio.shape[0], text.shape[0])
  return SplitEmbeddings(
    audio=audio, text=text, caption_clip_ids=caption_clip_ids, captions=captions, file_names=file_names
  )


def _max_segment_frames(embedder: Embedder, form, max_frames: int | None) -> int:
  """`input_pipeline.max_segment_frames` of the embedder's max_segment_s; a ValueError when their padded length
  exceeds the tower's `max_frames`."""
  frames = input_pipeline.max_segment_frames(embedder.max_segment_s, form)
  if max_frames is not None and input_pipeline.padded_frames(frames) > max_frames:
    raise ValueError(
      f"config.eval.max_segment_s={embedder.max_segment_s}: segments padded to "
      f"{input_pipeline.padded_frames(frames)} frames are longer than the {max_frames} the audio tower takes"
    )
  return frames


def embed_captions(
  embedder: Embedder, variables, captions: list, *, encode_captions: CaptionEncoder, global_batch_size: int
) -> np.ndarray:
  """Embeddings [len(captions), D] of any caption list (identical on every process; each process encodes its slice
  of each padded global batch)."""
  if len(captions) == 0:
    raise ValueError("embed_captions: the caption list is empty")
  sharding.check_global_batch(global_batch_size, "eval.batch_size")
  batches = input_pipeline.caption_batches(
    captions,
    encode_captions,
    global_batch_size=global_batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  return np.concatenate([embedder.text(variables, local)[:count] for local, count in batches])


def embed_clips(embedder: Embedder, variables, clips: list, form, *, global_batch_size: int) -> np.ndarray:
  """Embeddings [len(clips), D] of clips of any lengths in the stored form `form` (`audio_forms.AudioForm`: float16
  (frames, 64) log-mels or int16 waveforms), by the module docstring's rule (identical on every process): the
  clips' segments batched as `embed_split` batches a split's (`input_pipeline.segment_batches`)."""
  local_batch_size = sharding.check_global_batch(global_batch_size, "eval.batch_size")
  if not clips:
    raise ValueError("embed_clips: the clip list is empty")
  frames = np.array([form.frames(len(clip)) for clip in clips], np.int64)
  segment_frames = _max_segment_frames(embedder, form, None)
  batches = input_pipeline.segment_batches(
    enumerate(clips),
    frames,
    form,
    batch_size=local_batch_size,
    max_segment_frames=segment_frames,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  counts = input_pipeline.segment_counts(frames, segment_frames)
  return embed_segment_batches(embedder, variables, batches, counts, global_batch_size=global_batch_size)


def _gather_rows(local_rows: np.ndarray) -> np.ndarray:
  """Concatenation over processes (in process order) of each process's rows of a batch."""
  if jax.process_count() == 1:
    return np.asarray(local_rows)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(np.asarray(local_rows), tiled=True))
