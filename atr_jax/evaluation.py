"""Embedding a whole split (every clip and caption) or any caption list, for retrieval metrics and submissions.

Every clip is embedded once and whole, and every caption once, in fixed-size batches (padding rows masked): clips
are padded to a few lengths (`input_pipeline.padded_frames`), so the jitted functions compile a few times, and every
process runs the same steps. A clip's embedding never depends on its batch-mates or on its padding: padding frames
are masked inside the audio tower.
"""

import dataclasses

import jax
import numpy as np
from absl import logging

from atr_jax import sharding
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
  (default: replicated over the mesh)."""

  def __init__(self, model, mesh, variable_shardings=None):
    self._mesh = mesh
    batch = sharding.batch_sharding(mesh)
    variables = sharding.replicated(mesh) if variable_shardings is None else variable_shardings

    def embed_audio(variables, audio, audio_mask):
      return model.apply(variables, audio, audio_mask, train=False, method="embed_audio")

    def embed_text(variables, input_ids, attention_mask):
      return model.apply(variables, input_ids, attention_mask, train=False, method="embed_text")

    self._audio = jax.jit(embed_audio, in_shardings=(variables, batch, batch), out_shardings=batch)
    self._text = jax.jit(embed_text, in_shardings=(variables, batch, batch), out_shardings=batch)

  def audio(self, variables, local_batch: dict) -> np.ndarray:
    """Embeddings of a batch's audio (`registry.audio_inputs`: log-mels or waveforms, with their mask)."""
    audio, audio_mask = audio_inputs(local_batch)
    batch = sharding.global_batch({"audio": audio, "audio_mask": audio_mask}, self._mesh)
    return sharding.to_host(self._audio(variables, batch["audio"], batch["audio_mask"]))

  def text(self, variables, local_batch: dict) -> np.ndarray:
    batch = sharding.global_batch(local_batch, self._mesh)
    return sharding.to_host(self._text(variables, batch["input_ids"], batch["attention_mask"]))


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
  """Embeddings of every clip and caption of `split` (identical on every process); `max_frames` is the longest clip
  the audio tower supports (None: any), a longer clip is an error."""
  local_batch_size = sharding.check_global_batch(global_batch_size, "eval.batch_size")
  captions, caption_clip_ids, file_names = input_pipeline.eval_captions(builder, split)

  audio = None
  for local in input_pipeline.eval_clip_batches(
    builder,
    split,
    batch_size=local_batch_size,
    max_frames=max_frames,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ):
    emb = embedder.audio(variables, local)
    valid = _gather_rows(local["valid"])
    clip_ids = _gather_rows(local["clip_id"])
    if audio is None:
      audio = np.zeros((len(file_names), emb.shape[1]), np.float32)
    audio[clip_ids[valid]] = emb[valid]

  text = embed_captions(
    embedder, variables, captions, encode_captions=encode_captions, global_batch_size=global_batch_size
  )
  logging.info("Embedded split %s: %d clips, %d captions", split, audio.shape[0], text.shape[0])
  return SplitEmbeddings(
    audio=audio, text=text, caption_clip_ids=caption_clip_ids, captions=captions, file_names=file_names
  )


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
  (frames, 64) log-mels or int16 waveforms), each whole (identical on every process): clips grouped by padded length
  (`input_pipeline.padded_frames` of their frames, as `embed_split`), in padded global batches of which each process
  fills and embeds its slice."""
  local_batch_size = sharding.check_global_batch(global_batch_size, "eval.batch_size")
  first_row = jax.process_index() * local_batch_size
  embeddings = None
  padded = np.array([input_pipeline.padded_frames(form.frames(len(x))) for x in clips], np.int64)
  for frames in sorted(set(padded.tolist())):
    ids = np.flatnonzero(padded == frames)
    rows = frames * form.rows_per_frame
    for start in range(0, len(ids), global_batch_size):
      chunk = ids[start : start + global_batch_size]
      batch = np.zeros((local_batch_size, rows, *form.row_shape), np.float32)
      mask = np.zeros((local_batch_size, rows), bool)
      for row, index in enumerate(chunk[first_row : first_row + local_batch_size]):
        batch[row, : len(clips[index])] = form.to_float32(clips[index])
        mask[row, : len(clips[index])] = True
      emb = embedder.audio(variables, {form.name: batch, form.mask: mask})
      if embeddings is None:
        embeddings = np.zeros((len(clips), emb.shape[1]), np.float32)
      embeddings[chunk] = emb[: len(chunk)]
  if embeddings is None:
    raise ValueError("embed_clips: the clip list is empty")
  return embeddings


def _gather_rows(local_rows: np.ndarray) -> np.ndarray:
  """Concatenation over processes (in process order) of each process's rows of a batch."""
  if jax.process_count() == 1:
    return np.asarray(local_rows)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(np.asarray(local_rows), tiled=True))
