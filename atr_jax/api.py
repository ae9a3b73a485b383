"""The trained model of a workdir for Python users (`atr_jax.load`), and the one embedding path that `retrieve`,
`zeroshot` and `serve` share: the workdir's best checkpoint restored on one device, captions embedded with the
run's caption encoder (`evaluation.embed_captions`), clips by evaluation's one rule (`evaluation.embed_clips`: whole
up to config.eval.max_segment_s, longer clips in segments); plus the index folder format (`write_index`,
`read_index`, `check_index_matches`) and exact top-k ranking.

An index is a folder holding `embeddings.npy` (float32 [N, D], unit rows) and `files.json` (the N paths, relative
to the indexed folder, the indexed folder, and the model that made them: `model_identity.ModelIdentity.record()`);
`search` refuses an index that another model made. Audio files stream through in chunks of
CHUNK_BATCHES batches: decoded by the data preparation's `Extractor` worker processes (the next chunk decodes while
one embeds), embedded, and written to a work folder, so memory holds one chunk of clips however many files there
are, and a killed run resumes after its last written chunk (`embed_audio_files`).
"""

from atr_jax import xla_flags

xla_flags.set_defaults()  # Before jax is imported.

import glob  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import numbers  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
from concurrent import futures  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tqdm  # noqa: E402
from absl import logging  # noqa: E402

from atr_jax import checkpointing, evaluation, model_identity, sharding, tokenization  # noqa: E402
from atr_jax.atomic_files import write_atomically, write_folder_atomically, write_text_atomically  # noqa: E402
from atr_jax.models.dual_encoder import build_model  # noqa: E402
from atr_jax.models.registry import audio_tower  # noqa: E402
from data_pipelines import audio_forms, extraction, features  # noqa: E402

EMBEDDINGS_FILE = "embeddings.npy"
FILES_FILE = "files.json"
CHUNK_BATCHES = 16  # Batches of files per chunk: what is decoded, held in memory and written at a time.
PROGRESS_FILE = "progress.json"  # In a work folder: the files, chunk size and checkpoint its chunks belong to.


class Model:
  """The trained dual encoder of a workdir (`atr_jax.load`), embedding captions and audio into one space of unit
  vectors (batches sharded over the devices)."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
    self.config, manager, self.step = model_identity.read_workdir(self.workdir)
    self.identity = model_identity.of_config(self.workdir, self.step, self.config)  # What embeddings it makes.
    state = checkpointing.restore_on_one_device(manager, self.step)
    self.variables = {"params": state["params"]["model"], "batch_stats": state["batch_stats"]}
    self.encode_captions = tokenization.caption_encoder(self.config)
    self._embedder = evaluation.Embedder(
      build_model(self.config.model), sharding.create_mesh(), max_segment_s=self.config.eval.max_segment_s
    )
    # The stored form the model takes (runs from before config.data.audio_feature existed took log-mels).
    self.audio_form = audio_forms.audio_form(self.config.data.get("audio_feature", "log_mel"))
    logging.info("Loaded %s at step %d", self.workdir, self.step)

  def __repr__(self) -> str:
    return f"atr_jax.load({self.workdir!r})  # step {self.step}, {self.embed_dim}-d embeddings"

  @property
  def embed_dim(self) -> int:
    return self.config.model.embed_dim

  def _batch_size(self, requested: int) -> int:
    """`requested` rounded up to a multiple of the device count (batches are sharded over all devices)."""
    devices = jax.device_count()
    return -(-max(requested, 1) // devices) * devices

  def embed_text(self, texts: list, batch_size: int = 64) -> np.ndarray:
    """Embeddings [len(texts), D] (unit rows) of a list of captions or queries, in batches of at most
    `batch_size` (a single query is not padded to a full batch)."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
      raise TypeError(f"texts must be a list of strings, got {type(texts).__name__} (wrap one text: [text])")
    if not texts:
      raise ValueError("texts is an empty list: give at least one text")
    for position, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f"texts[{position}] is a {type(text).__name__}, not a str")
    return evaluation.embed_captions(
      self._embedder,
      self.variables,
      list(texts),
      encode_captions=self.encode_captions,
      global_batch_size=self._batch_size(min(batch_size, len(texts))),
    )

  def embed_audio(
    self, files_or_arrays: list, sample_rate: float | None = None, batch_size: int = 16, workers: int | None = None
  ) -> np.ndarray:
    """Embeddings [len(files_or_arrays), D] (unit rows), in order, of clips of any length given as audio file paths
    (any format soundfile reads; decoded by `workers` processes, default one per core) or float arrays of samples
    ((samples,) mono or (samples, channels)) at `sample_rate` Hz, which every array must be given with. A progress
    bar shows when there is more than one batch of files. Errors name the file or argument at fault."""
    if isinstance(files_or_arrays, (str, os.PathLike, np.ndarray)) or not isinstance(files_or_arrays, (list, tuple)):
      raise TypeError(
        f"files_or_arrays must be a list of file paths or float arrays, got {type(files_or_arrays).__name__} "
        "(wrap one clip: [clip])"
      )
    if not files_or_arrays:
      raise ValueError("files_or_arrays is an empty list: give at least one file path or array")
    is_path = [isinstance(item, (str, os.PathLike)) for item in files_or_arrays]
    embeddings = np.zeros((len(files_or_arrays), self.embed_dim), np.float32)
    positions = [position for position, path in enumerate(is_path) if path]
    if positions:
      paths = [os.fspath(files_or_arrays[position]) for position in positions]
      for path in paths:
        if not os.path.isfile(path):
          raise FileNotFoundError(
            f"audio file {path} does not exist" if not os.path.exists(path) else f"{path} is not a file"
          )
      found, _, skipped = self.embed_audio_files(paths, batch_size, workers=workers)
      if skipped:
        raise features.AudioError("cannot embed " + "; ".join(reason for _, reason in skipped))
      embeddings[positions] = found
    positions = [position for position, path in enumerate(is_path) if not path]
    if positions:
      _check_sample_rate(sample_rate)
      clips = [self._stored_clip(files_or_arrays[position], sample_rate, position) for position in positions]
      embeddings[positions] = self.embed_clips(clips, batch_size)
    return embeddings

  def _stored_clip(self, samples, sample_rate: float, position: int) -> np.ndarray:
    """The stored form (`self.audio_form`) of the float array `samples` at `sample_rate` Hz, as `extraction` makes
    it of a file; errors name files_or_arrays[position]."""
    name = f"files_or_arrays[{position}]"
    samples = np.asarray(samples)
    if not np.issubdtype(samples.dtype, np.floating):
      raise TypeError(f"{name} is a {samples.dtype} array: give float samples (full scale 1.0) or a file path")
    if samples.ndim not in (1, 2) or samples.size == 0:
      raise ValueError(f"{name} has shape {samples.shape}: give (samples,) mono or (samples, channels) audio")
    if not np.isfinite(samples).all():
      raise ValueError(f"{name} holds NaN or infinite samples")
    waveform = features.to_mono_32k(samples.astype(np.float32).reshape(len(samples), -1), sample_rate)
    try:
      return self.audio_form.compute(waveform)
    except features.AudioError as error:
      raise features.AudioError(f"{name}: {error}", error.reason) from None

  def embed_clips(self, clips: list, batch_size: int = 16) -> np.ndarray:
    """Embeddings [len(clips), D] of clips of any lengths in the model's stored form (`self.audio_form`: (frames,
    64) log-mels or waveforms), by evaluation's rule (`evaluation.embed_clips`)."""
    if not clips:
      return np.zeros((0, self.embed_dim), np.float32)
    return evaluation.embed_clips(
      self._embedder, self.variables, clips, self.audio_form, global_batch_size=self._batch_size(batch_size)
    )

  def embed_audio_files(
    self, paths: list, batch_size: int = 16, *, work_dir: str | None = None, workers: int | None = None
  ) -> tuple[np.ndarray, list, list]:
    """(embeddings of the readable files, their paths, [(path, reason)] of the skipped ones), chunk by chunk under a
    progress bar (when there is more than one batch): `workers` decoding processes (default: one per core) fill a
    feature cache in `work_dir`, and each chunk's embeddings go to a chunk file there. A call with the `work_dir` of
    a killed call for the same paths, chunk size and model (`self.identity`) embeds only the chunks it had not
    written. Without `work_dir`: a temporary folder."""
    if work_dir is None:
      with tempfile.TemporaryDirectory(prefix="atr_jax_embed_") as temporary:
        return self.embed_audio_files(paths, batch_size, work_dir=temporary, workers=workers)
    chunk_size = self._batch_size(batch_size) * CHUNK_BATCHES
    chunks = [paths[start : start + chunk_size] for start in range(0, len(paths), chunk_size)]
    names = [os.path.join(work_dir, f"chunk-{number:06d}.npz") for number in range(len(chunks))]
    self._start_work(work_dir, paths, chunk_size)
    todo = [number for number, name in enumerate(names) if not os.path.exists(name)]
    done_files = len(paths) - sum(len(chunks[number]) for number in todo)
    with (
      extraction.Extractor(os.path.join(work_dir, "clips"), workers, self.audio_form.name) as extractor,
      futures.ThreadPoolExecutor(1) as decoder,
      tqdm.tqdm(
        total=len(paths),
        initial=done_files,
        desc="embedding audio",
        unit="file",
        disable=len(paths) <= self._batch_size(batch_size),
      ) as progress,
    ):
      decode = lambda number: decoder.submit(extractor.run, chunks[number], "", progress)  # noqa: E731
      decoding = decode(todo[0]) if todo else None
      for position, number in enumerate(todo):
        outcomes = decoding.result()
        if position + 1 < len(todo):
          decoding = decode(todo[position + 1])
        self._write_chunk(names[number], outcomes, batch_size)
    return _read_chunks(names, chunks, self.embed_dim)

  def _start_work(self, work_dir: str, paths: list, chunk_size: int) -> None:
    """Keeps the chunk files of `work_dir` if its progress record is this work's, else deletes them and records it
    (the feature cache stays: it is keyed by each file's path, size and time)."""
    record = {
      "files": len(paths),
      "files_sha1": hashlib.sha1("\n".join(paths).encode("utf-8")).hexdigest(),
      "chunk_size": chunk_size,
      **self.identity.record(),
    }
    record_path = os.path.join(work_dir, PROGRESS_FILE)
    try:
      with open(record_path) as f:
        if json.load(f) == record:
          return
    except (OSError, ValueError):
      pass
    os.makedirs(work_dir, exist_ok=True)
    for name in glob.glob(os.path.join(work_dir, "chunk-*.npz")):
      os.remove(name)
    write_text_atomically(record_path, json.dumps(record))

  def _write_chunk(self, name: str, outcomes: list, batch_size: int) -> None:
    """Embeds the decoded clips of one chunk into the chunk file `name` (embeddings of the kept files, and the skip
    reason of each file, "" when kept), then drops their features from the cache."""
    cached = [outcome.cache_path for outcome in outcomes if outcome.cache_path]
    embeddings = self.embed_clips([extraction.load_clip(path) for path in cached], batch_size)
    reasons = np.array(["" if outcome.cache_path else outcome.detail or outcome.reason for outcome in outcomes])
    write_atomically(name, lambda f: np.savez(f, embeddings=embeddings, reasons=reasons))
    for path in set(cached):
      os.remove(path)

  def embed_split(self, builder, split: str) -> evaluation.SplitEmbeddings:
    """Every clip and caption of a prepared `split`, as evaluation embeds them."""
    return evaluation.embed_split(
      self._embedder,
      self.variables,
      builder,
      split,
      encode_captions=self.encode_captions,
      global_batch_size=self._batch_size(self.config.eval.batch_size),
      max_frames=audio_tower(self.config.model.audio).max_frames,
    )

  def similarity(self, a, b) -> np.ndarray:
    """Cosine similarities of the embeddings `a` ([N, D] or [D]) and `b` ([M, D] or [D]): [N, M], [N], [M] or a
    scalar, as the inputs are 2-D or 1-D."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    for name, x in (("a", a), ("b", b)):
      if x.ndim not in (1, 2) or x.shape[-1] != self.embed_dim:
        raise ValueError(
          f"{name} has shape {x.shape}: give embeddings of shape [N, {self.embed_dim}] or [{self.embed_dim}]"
        )
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # noqa: E731
    return unit(a) @ unit(b).T

  def search(self, query, index, top_k: int = 10) -> list:
    """The `top_k` best entries of `index` for `query`, best first, as (name, cosine score) pairs.

    `query`: a text (str), a list of texts, or embeddings ([D] or [Q, D], e.g. `embed_audio([file])` to search with
    audio). `index`: an index folder (`python -m atr_jax.retrieve index`; names are the files' paths relative to
    the indexed folder; a `model_identity.ModelMismatch` if another model made it) or a pair (embeddings [N, D], N
    names). One query gives one list, several a list of lists."""
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
      raise ValueError(f"top_k={top_k!r} must be a positive integer")
    if isinstance(index, (str, os.PathLike)):
      check_index_matches(os.fspath(index), self.identity)
      embeddings, names = read_index(os.fspath(index))
      index_name = f"index {os.fspath(index)}"
    else:
      try:
        embeddings, names = index
      except (TypeError, ValueError):
        raise TypeError("index must be an index folder or a pair (embeddings [N, D], N names)") from None
      embeddings, names, index_name = np.asarray(embeddings, np.float32), list(names), "index"
      if embeddings.ndim != 2 or len(embeddings) != len(names):
        raise ValueError(f"index: embeddings of shape {embeddings.shape} for {len(names)} names")
    if embeddings.shape[1] != self.embed_dim:
      raise ValueError(
        f"{index_name} holds {embeddings.shape[1]}-d embeddings; this model ({self.workdir}) makes {self.embed_dim}-d"
      )
    if isinstance(query, str) or (isinstance(query, (list, tuple)) and query and isinstance(query[0], str)):
      single = isinstance(query, str)
      queries = self.embed_text([query] if single else list(query))
    else:
      single = np.ndim(query) == 1
      queries = np.atleast_2d(np.asarray(query, np.float32))
      if queries.ndim != 2 or queries.shape[1] != self.embed_dim:
        raise ValueError(f"query has shape {np.shape(query)}: give texts or [Q, {self.embed_dim}] embeddings")
    results = [[(names[i], float(score)) for i, score in zip(*ranked_top_k(embeddings, q, top_k))] for q in queries]
    return results[0] if single else results


def _check_sample_rate(sample_rate) -> None:
  if sample_rate is None:
    raise ValueError("sample_rate is missing: arrays need the rate of their samples (e.g. sample_rate=44100)")
  if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real) or not 0 < sample_rate < np.inf:
    raise ValueError(f"sample_rate={sample_rate!r} must be a positive number of samples per second")


def ranked_top_k(embeddings: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices and scores of the k rows of `embeddings` most similar to `query`, best first."""
  scores = embeddings @ query
  k = min(k, len(scores))
  best = np.argpartition(-scores, k - 1)[:k]
  best = best[np.argsort(-scores[best], kind="stable")]
  return best, scores[best]


def _read_chunks(names: list, chunks: list, embed_dim: int) -> tuple[np.ndarray, list, list]:
  """`embed_audio_files`' answer from its chunk files."""
  embeddings, kept, skipped = [np.zeros((0, embed_dim), np.float32)], [], []
  for name, paths in zip(names, chunks):
    with np.load(name) as chunk:
      embeddings.append(chunk["embeddings"])
      reasons = chunk["reasons"].tolist()
    kept += [path for path, reason in zip(paths, reasons) if not reason]
    skipped += [(path, reason) for path, reason in zip(paths, reasons) if reason]
  return np.concatenate(embeddings), kept, skipped


def write_index(index_dir: str, embeddings: np.ndarray, files: list, source: dict) -> None:
  """Writes the index atomically: a killed run leaves the previous index (or none), never half of one."""

  def write(folder: str) -> None:
    np.save(os.path.join(folder, EMBEDDINGS_FILE), embeddings.astype(np.float32))
    with open(os.path.join(folder, FILES_FILE), "w") as f:
      json.dump({"files": files, **source}, f, indent=1)

  write_folder_atomically(index_dir, write)


def read_index_record(index_dir: str) -> dict:
  """The `files.json` of an index: "files" (paths relative to "audio_dir", the indexed folder) and the model that
  made it (`model_identity.ModelIdentity.record()`); a FileNotFoundError unless the index has both its files."""
  emb_path, files_path = os.path.join(index_dir, EMBEDDINGS_FILE), os.path.join(index_dir, FILES_FILE)
  if not (os.path.isfile(emb_path) and os.path.isfile(files_path)):
    raise FileNotFoundError(
      f"{index_dir} is not an index (needs {EMBEDDINGS_FILE} and {FILES_FILE}); "
      "make one with `python -m atr_jax.retrieve index`"
    )
  with open(files_path) as f:
    return json.load(f)


def read_index(index_dir: str) -> tuple[np.ndarray, list]:
  """(embeddings [N, D], the N file paths relative to the indexed folder) of an index folder, unchecked:
  `check_index_matches` says whether a model may query it."""
  files = read_index_record(index_dir)["files"]
  embeddings = np.load(os.path.join(index_dir, EMBEDDINGS_FILE))
  if len(files) != len(embeddings):
    raise ValueError(f"{index_dir}: {len(embeddings)} embeddings but {len(files)} file names")
  return embeddings, files


def check_index_matches(index_dir: str, identity: model_identity.ModelIdentity) -> None:
  """A `model_identity.ModelMismatch` naming both models and the command that rebuilds the index unless the index
  `index_dir` was made by the model `identity` (`model_identity.of_workdir(workdir)`, or a Model's `identity`)."""
  recorded = read_index_record(index_dir)
  rebuild = ["python", "-m", "atr_jax.retrieve", "index", f"--workdir={identity.workdir}"]
  rebuild += [f"--audio_dir={recorded.get('audio_dir', 'AUDIO_DIR')}", f"--index={os.path.abspath(index_dir)}"]
  model_identity.check(recorded, identity, f"the index {index_dir}", rebuild)
