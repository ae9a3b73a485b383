"""TensorBoard examples of retrieval on a split: a few caption queries with their top-k clips, and the top hit's audio.

Cheap by design (a handful of queries, a few seconds of audio each): written once per evaluation by process 0 only.
The queries are the same captions at every evaluation (evenly spaced over the split), so their results can be
compared across epochs. Audio is read from the raw folder, where its layout (``data_pipelines.layouts``: native,
aac-datasets or reference) keeps the split's audio; a clip that cannot be read is logged and left silent, never
fatal.
"""

import os

import jax
import numpy as np
from absl import logging

from atr_jax.evaluation import SplitEmbeddings
from atr_jax.submission import top_k_clips
from data_pipelines import features, layouts


def query_indices(num_captions: int, num_queries: int) -> np.ndarray:
  """``num_queries`` caption rows evenly spaced over ``[0, num_captions)`` (all of them when there are fewer)."""
  return np.unique(np.linspace(0, num_captions - 1, min(num_queries, num_captions)).round().astype(np.int64))


def retrieval_examples_markdown(emb: SplitEmbeddings, queries: np.ndarray, top: np.ndarray) -> str:
  """Markdown: each query caption, its true clip, its ranked clips (the true one marked) and whether it is in."""
  lines = []
  for query, clips in zip(queries, top):
    true_clip = int(emb.caption_clip_ids[query])
    lines.append(f"**{emb.captions[query]}** (true clip: `{emb.file_names[true_clip]}`)\n")
    lines += [
      f"{rank}. `{emb.file_names[c]}`" + (" **(true clip)**" if c == true_clip else "")
      for rank, c in enumerate(clips, start=1)
    ]
    lines.append(f"\ntrue clip in the top {len(clips)}: {'yes' if true_clip in clips else 'no'}\n")
  return "\n".join(lines)


def write_retrieval_examples(
  writer,
  step: int,
  emb: SplitEmbeddings,
  *,
  dataset: str,
  raw_dir: str,
  split: str,
  num_queries: int = 4,
  top_k: int = 5,
  audio_seconds: float = 5.0,
) -> None:
  """Writes ``<split>/retrieval_examples`` (text) and ``<split>/top_hits`` (the first ``audio_seconds`` of each
  query's top clip, zero-padded, one audio per query, read from ``raw_dir``, a ``dataset`` folder in any of its
  layouts) through a clu metric writer; only process 0 writes."""
  if jax.process_index() != 0:
    return
  queries = query_indices(len(emb.captions), num_queries)
  top = top_k_clips(emb.text[queries], emb.audio, min(top_k, emb.audio.shape[0]))
  writer.write_texts(step, {f"{split}/retrieval_examples": retrieval_examples_markdown(emb, queries, top)})
  length = int(audio_seconds * features.SAMPLE_RATE)
  audios = np.zeros((len(queries), length, 1), np.float32)
  layout = layouts.find(dataset, os.path.expanduser(raw_dir))
  for row, clip in enumerate(top[:, 0]):
    path = layout.audio_path(split, emb.file_names[clip])
    try:
      waveform = features.load_audio(path)[:length]
    except features.AudioError as e:
      logging.warning("Retrieval examples: no audio for the top hit of query %d: %s", row, e)
      continue
    audios[row, : waveform.size, 0] = np.clip(waveform, -1.0, 1.0)
  writer.write_audios(step, {f"{split}/top_hits": audios}, sample_rate=features.SAMPLE_RATE)
