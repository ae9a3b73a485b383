"""Top-k clip retrieval for caption queries and the DCASE Task 6b submission file (SPEC 6).

The file is a CSV with the header ``caption,fname_1,...,fname_10``: one row per query caption (in the given order)
holding the file names of its 10 best clips, best first. Scores are dot products of the given (L2-normalised)
embeddings, computed one block of captions at a time (``metrics.score_blocks``), so any number of captions fits.
Equal scores are ordered by clip index.
"""

from __future__ import annotations

import csv
import os

import numpy as np

from atr_jax.atomic_files import write_atomically
from atr_jax.metrics import score_blocks

SUBMISSION_TOP_K = 10


def top_k_clips(text_emb, audio_emb, k: int, block_size: int | None = None) -> np.ndarray:
  """Indices [N_t, k] of the k highest-scoring clips (rows of ``audio_emb``) of each caption, best first."""
  text, audio = np.asarray(text_emb), np.asarray(audio_emb)
  if text.ndim != 2 or audio.ndim != 2 or text.shape[1] != audio.shape[1]:
    raise ValueError(f"text_emb and audio_emb must be [N, D] with the same D, got {text.shape} and {audio.shape}")
  if not 1 <= k <= audio.shape[0]:
    raise ValueError(f"k={k} must be between 1 and the number of clips ({audio.shape[0]})")
  top = np.empty((text.shape[0], k), np.int64)
  for block, scores in score_blocks(text, audio, block_size):
    if k < audio.shape[0]:
      candidates = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
      candidates = np.broadcast_to(np.arange(k), scores.shape)
    candidate_scores = np.take_along_axis(scores, candidates, axis=1)
    order = np.lexsort((candidates, -candidate_scores), axis=1)  # by score descending, then clip index
    top[block] = np.take_along_axis(candidates, order, axis=1)
  return top


def write_submission(
  path: str, captions: list[str], text_emb, audio_emb, file_names: list[str], block_size: int | None = None
) -> None:
  """Writes the DCASE submission CSV for ``captions`` (embedded as ``text_emb`` rows) against the clips
  ``audio_emb`` whose file names are ``file_names``."""
  if len(captions) != np.shape(text_emb)[0]:
    raise ValueError(f"{len(captions)} captions but {np.shape(text_emb)[0]} caption embeddings")
  if len(file_names) != np.shape(audio_emb)[0]:
    raise ValueError(f"{len(file_names)} file names but {np.shape(audio_emb)[0]} clip embeddings")
  top = top_k_clips(text_emb, audio_emb, SUBMISSION_TOP_K, block_size)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)

  def write(f) -> None:
    writer = csv.writer(f)
    writer.writerow(["caption"] + [f"fname_{i}" for i in range(1, SUBMISSION_TOP_K + 1)])
    for caption, clips in zip(captions, top):
      writer.writerow([caption] + [file_names[c] for c in clips])

  write_atomically(path, write, text=True)
