"""Retrieval for users, from a trained workdir (its best checkpoint and the config saved beside it).

  python -m atr_jax.retrieve index --workdir RUN --audio_dir DIR --index INDEX   # embed every audio file of DIR
  python -m atr_jax.retrieve text  --workdir RUN --index INDEX --query "a dog barks" [--top_k 10]
  python -m atr_jax.retrieve text  --workdir RUN --audio_dir DIR --query "a dog barks"  # no index: embeds DIR
  python -m atr_jax.retrieve audio --workdir RUN --audio FILE --captions CAPTIONS.txt [--top_k 5]
  python -m atr_jax.retrieve submission --workdir RUN --audio_dir DIR --captions retrieval_captions.csv --out F.csv
  python -m atr_jax.retrieve embed-train --workdir RUN --out RUN/teacher  # a teacher folder for config.distill

An index is a folder holding `embeddings.npy` (float32 [N, D], unit rows) and `files.json` (the N paths, relative
to the indexed folder, the indexed folder, and the model that made them: `model_identity.ModelIdentity.record()`).
`text --index` stops with an error naming both models, and the command that rebuilds the index, when the index was
made by another model than --workdir's (another checkpoint step or model config fingerprint; an index written before
fingerprints is checked by step alone, with a warning). Clips are embedded whole, any length, with padding
masked inside the audio tower, so an embedding is the same whether a file is embedded alone or in a batch.
Audio files stream through in chunks of CHUNK_BATCHES batches: decoded by the data preparation's `Extractor` worker
processes (the next chunk decodes while one embeds), embedded, and written to a work folder (`INDEX.partial` for
`index`), so memory holds one chunk of clips however many files there are, and a killed `index` run resumes after
its last written chunk. Audio files that cannot be decoded or are too short are reported and skipped.
"""

from atr_jax import xla_flags

xla_flags.set_defaults()  # Before jax is imported.

import glob  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from concurrent import futures  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tqdm  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from atr_jax import checkpointing, distillation, evaluation, model_identity, sharding, tokenization  # noqa: E402
from atr_jax.atomic_files import write_atomically, write_folder_atomically, write_text_atomically  # noqa: E402
from atr_jax.models.dual_encoder import build_model  # noqa: E402
from atr_jax.models.registry import audio_tower  # noqa: E402
from atr_jax.submission import write_submission  # noqa: E402
from data_pipelines import audio_forms, datasets, extraction, features, input_pipeline  # noqa: E402

EMBEDDINGS_FILE = "embeddings.npy"
FILES_FILE = "files.json"
CHUNK_BATCHES = 16  # Batches of files per chunk: what is decoded, held in memory and written at a time.
PROGRESS_FILE = "progress.json"  # In a work folder: the files, chunk size and checkpoint its chunks belong to.


class Retriever:
  """The trained dual encoder of a workdir, embedding audio files and captions (batches sharded over the devices)."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(os.path.expanduser(workdir))
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

  def _batch_size(self, requested: int) -> int:
    """`requested` rounded up to a multiple of the device count (batches are sharded over all devices)."""
    devices = jax.device_count()
    return -(-max(requested, 1) // devices) * devices

  def embed_clips(self, clips: list, batch_size: int = 16) -> np.ndarray:
    """Embeddings [len(clips), D] of clips of any lengths in the model's stored form (`self.audio_form`: (frames,
    64) log-mels or waveforms), each whole (`evaluation.embed_clips`, as in evaluation)."""
    if not clips:
      return np.zeros((0, self.config.model.embed_dim), np.float32)
    return evaluation.embed_clips(
      self._embedder, self.variables, clips, self.audio_form, global_batch_size=self._batch_size(batch_size)
    )

  def embed_audio_files(
    self, paths: list, batch_size: int = 16, *, work_dir: str | None = None, workers: int | None = None
  ) -> tuple[np.ndarray, list, list]:
    """(embeddings of the readable files, their paths, [(path, reason)] of the skipped ones), chunk by chunk under a
    progress bar: `workers` decoding processes (default: one per core) fill a feature cache in `work_dir`, and each
    chunk's embeddings go to a chunk file there. A call with the `work_dir` of a killed call for the same paths,
    chunk size and model (`self.identity`) embeds only the chunks it had not written. Without `work_dir`: a
    temporary folder."""
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
      tqdm.tqdm(total=len(paths), initial=done_files, desc="embedding audio", unit="file") as progress,
    ):
      decode = lambda number: decoder.submit(extractor.run, chunks[number], "", progress)  # noqa: E731
      decoding = decode(todo[0]) if todo else None
      for position, number in enumerate(todo):
        outcomes = decoding.result()
        if position + 1 < len(todo):
          decoding = decode(todo[position + 1])
        self._write_chunk(names[number], outcomes, batch_size)
    return _read_chunks(names, chunks, self.config.model.embed_dim)

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
    """Every clip (whole) and caption of a prepared `split`, as evaluation embeds them."""
    return evaluation.embed_split(
      self._embedder,
      self.variables,
      builder,
      split,
      encode_captions=self.encode_captions,
      global_batch_size=self._batch_size(self.config.eval.batch_size),
      max_frames=audio_tower(self.config.model.audio).max_frames,
    )

  def embed_texts(self, texts: list, batch_size: int = 64) -> np.ndarray:
    """Embeddings of `texts`, in batches of at most `batch_size` (a single query is not padded to a full batch)."""
    return evaluation.embed_captions(
      self._embedder,
      self.variables,
      list(texts),
      encode_captions=self.encode_captions,
      global_batch_size=self._batch_size(min(batch_size, len(texts))),
    )


def audio_files(folder: str) -> list:
  """Every file below `folder` whose extension is an audio format soundfile reads, sorted."""
  extensions = features.audio_extensions()
  found = [
    os.path.join(root, name)
    for root, _, names in os.walk(folder)
    for name in names
    if os.path.splitext(name)[1].lower() in extensions
  ]
  return sorted(found)


def top_k(embeddings: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
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


def index_folder(
  retriever: Retriever, audio_dir: str, index_dir: str, batch_size: int, workers: int | None = None
) -> tuple[list, list]:
  """Indexes every audio file below `audio_dir` into `index_dir`, resuming the work a killed call left in
  `index_dir.partial` (removed once the index is written); returns (indexed paths, [(path, reason)] skipped)."""
  paths = audio_files(audio_dir)
  if not paths:
    raise app.UsageError(f"no audio file found below --audio_dir={audio_dir}")
  work_dir = index_dir.rstrip("/") + ".partial"
  embeddings, kept, skipped = retriever.embed_audio_files(paths, batch_size, work_dir=work_dir, workers=workers)
  write_index(
    index_dir,
    embeddings,
    [os.path.relpath(p, audio_dir) for p in kept],
    {"audio_dir": os.path.abspath(audio_dir), **retriever.identity.record()},
  )
  shutil.rmtree(work_dir)
  return kept, skipped


def embed_training_set(retriever: Retriever, out: str) -> dict:
  """Writes the teacher folder `out` (`atr_jax.distillation`): the embeddings of every clip and caption of the
  workdir's training sources (config.data: train_split and extra_train); returns its manifest's counts."""
  input_pipeline.leave_accelerators_to_jax()
  keys, audio, text = [], [], []
  for builder, split in datasets.train_sources(retriever.config.data):
    embedded = retriever.embed_split(builder, split)
    keys.append(distillation.source_keys(builder, split))
    audio.append(embedded.audio)
    text.append(embedded.text)
  manifest = retriever.identity.record()
  if jax.process_index() == 0:
    distillation.write_teacher(out, keys, audio, text, manifest)
  return {"clips": sum(len(a) for a in audio), "captions": sum(len(t) for t in text)}


def write_index(index_dir: str, embeddings: np.ndarray, files: list, source: dict) -> None:
  """Writes the index atomically: a killed run leaves the previous index (or none), never half of one."""

  def write(folder: str) -> None:
    np.save(os.path.join(folder, EMBEDDINGS_FILE), embeddings.astype(np.float32))
    with open(os.path.join(folder, FILES_FILE), "w") as f:
      json.dump({"files": files, **source}, f, indent=1)

  write_folder_atomically(index_dir, write)


def _index_paths(index_dir: str) -> tuple[str, str]:
  """The paths of an index's two files; a FileNotFoundError unless both exist."""
  emb_path, files_path = os.path.join(index_dir, EMBEDDINGS_FILE), os.path.join(index_dir, FILES_FILE)
  if not (os.path.isfile(emb_path) and os.path.isfile(files_path)):
    raise FileNotFoundError(
      f"{index_dir} is not an index (needs {EMBEDDINGS_FILE} and {FILES_FILE}); "
      "make one with `python -m atr_jax.retrieve index`"
    )
  return emb_path, files_path


def read_index(index_dir: str) -> tuple[np.ndarray, list]:
  """(embeddings, file names) of an index, unchecked: `check_index_matches` says whether a model may query it."""
  emb_path, files_path = _index_paths(index_dir)
  embeddings = np.load(emb_path)
  with open(files_path) as f:
    files = json.load(f)["files"]
  if len(files) != len(embeddings):
    raise ValueError(f"{index_dir}: {len(embeddings)} embeddings but {len(files)} file names")
  return embeddings, files


def check_index_matches(index_dir: str, identity: model_identity.ModelIdentity) -> None:
  """A `model_identity.ModelMismatch` naming both models and the command that rebuilds the index unless the index
  `index_dir` was made by the model `identity` (`model_identity.of_workdir(workdir)`, or a Retriever's `identity`)."""
  with open(_index_paths(index_dir)[1]) as f:
    recorded = json.load(f)
  rebuild = ["python", "-m", "atr_jax.retrieve", "index", f"--workdir={identity.workdir}"]
  rebuild += [f"--audio_dir={recorded.get('audio_dir', 'AUDIO_DIR')}", f"--index={os.path.abspath(index_dir)}"]
  model_identity.check(recorded, identity, f"the index {index_dir}", rebuild)


def read_captions(path: str) -> list:
  """Captions from a text file (one a line) or a CSV with a `caption` column or Clotho's caption_1..5 columns."""
  import csv

  with open(path, newline="", encoding="utf-8", errors="replace") as f:
    if not path.lower().endswith(".csv"):
      return [line.strip() for line in f if line.strip()]
    reader = csv.DictReader(f)
    columns = [c for c in reader.fieldnames or [] if c == "caption" or c.startswith("caption_")]
    if not columns:
      raise ValueError(f"{path}: no 'caption' or 'caption_N' column (header: {reader.fieldnames})")
    return [row[c].strip() for row in reader for c in columns if row.get(c, "").strip()]


_COMMANDS = ("index", "text", "audio", "submission", "embed-train")
flags.DEFINE_string("workdir", None, "Training workdir (holds config.json and checkpoints/).")
flags.DEFINE_string(
  "audio_dir", None, "index (or text without --index): folder of audio files to embed (searched recursively)."
)
flags.DEFINE_string("index", None, "index/text: the index folder to write or to search.")
flags.DEFINE_multi_string("query", None, "text: a query sentence (repeat the flag for several).")
flags.DEFINE_multi_string("audio", None, "audio: an audio file to query with (repeat for several).")
flags.DEFINE_string("captions", None, "audio / submission: captions (.txt one per line, or .csv).")
flags.DEFINE_string(
  "out", None, "submission: the DCASE CSV to write (caption,fname_1,...,fname_10); embed-train: the teacher folder."
)
flags.DEFINE_integer("top_k", 10, "Results per query.")
flags.DEFINE_integer("batch_size", 16, f"Audio files per embedding batch (a chunk holds {CHUNK_BATCHES} batches).")
flags.DEFINE_integer("workers", None, "Audio decoding processes (default: one per CPU core).", lower_bound=1)
FLAGS = flags.FLAGS


def _print_ranking(query: str, names: list, indices: np.ndarray, scores: np.ndarray) -> None:
  print(f"\n{query}")
  for rank, (i, score) in enumerate(zip(indices, scores), 1):
    print(f"  {rank:3d}  {score:+.4f}  {names[i]}")


def _read_nonempty_captions(path: str) -> list:
  captions = read_captions(path)
  if not captions:
    raise app.UsageError(f"{path} holds no caption")
  return captions


def _report_skipped(skipped: list) -> None:
  for path, reason in skipped:
    print(f"skipped {path}: {reason}", file=sys.stderr)


def _read_checked_index(index_dir: str, workdir: str) -> tuple[np.ndarray, list]:
  """`read_index` of an index made by `workdir`'s model (checked before that model loads); another model's index
  ends the command with one line naming both models and the command that rebuilds the index."""
  try:
    check_index_matches(index_dir, model_identity.of_workdir(workdir))
  except model_identity.ModelMismatch as error:
    sys.exit(f"error: {error}")
  return read_index(index_dir)


def _require(*names: str) -> None:
  missing = [f"--{n}" for n in names if not getattr(FLAGS, n)]
  if missing:
    raise app.UsageError(f"this command needs {' '.join(missing)}")


def main(argv):
  if len(argv) != 2 or argv[1] not in _COMMANDS:
    raise app.UsageError(f"give one command among {_COMMANDS}, e.g. `python -m atr_jax.retrieve index ...`")
  command = argv[1]
  _require("workdir")
  if command == "embed-train":
    _require("out")
    counts = embed_training_set(Retriever(FLAGS.workdir), FLAGS.out)
    print(f"wrote the embeddings of {counts['clips']} training clips and {counts['captions']} captions to {FLAGS.out}")
  elif command == "index":
    _require("audio_dir", "index")
    kept, skipped = index_folder(
      Retriever(FLAGS.workdir), FLAGS.audio_dir, FLAGS.index, FLAGS.batch_size, FLAGS.workers
    )
    _report_skipped(skipped)
    print(f"indexed {len(kept)} files ({len(skipped)} skipped) into {FLAGS.index}")
  elif command == "text":
    _require("query")
    if not (FLAGS.index or FLAGS.audio_dir):
      raise app.UsageError("the text command needs --index (made by the index command) or --audio_dir")
    if FLAGS.index:
      embeddings, files = _read_checked_index(FLAGS.index, FLAGS.workdir)
    retriever = Retriever(FLAGS.workdir)
    if not FLAGS.index:  # No index: embed the folder now.
      embeddings, kept, skipped = retriever.embed_audio_files(
        audio_files(FLAGS.audio_dir), FLAGS.batch_size, workers=FLAGS.workers
      )
      _report_skipped(skipped)
      files = [os.path.relpath(p, FLAGS.audio_dir) for p in kept]
    for query, emb in zip(FLAGS.query, retriever.embed_texts(FLAGS.query)):
      _print_ranking(query, files, *top_k(embeddings, emb, FLAGS.top_k))
  elif command == "submission":
    _require("audio_dir", "captions", "out")
    captions = _read_nonempty_captions(FLAGS.captions)
    retriever = Retriever(FLAGS.workdir)
    embeddings, kept, skipped = retriever.embed_audio_files(
      audio_files(FLAGS.audio_dir), FLAGS.batch_size, workers=FLAGS.workers
    )
    _report_skipped(skipped)
    write_submission(
      FLAGS.out, captions, retriever.embed_texts(captions), embeddings, [os.path.basename(p) for p in kept]
    )
    print(f"wrote the top 10 of {len(kept)} clips for {len(captions)} captions to {FLAGS.out}")
  else:
    _require("audio", "captions")
    captions = _read_nonempty_captions(FLAGS.captions)
    retriever = Retriever(FLAGS.workdir)
    caption_emb = retriever.embed_texts(captions)
    embeddings, kept, skipped = retriever.embed_audio_files(FLAGS.audio, FLAGS.batch_size, workers=FLAGS.workers)
    _report_skipped(skipped)
    for path, emb in zip(kept, embeddings):
      _print_ranking(path, captions, *top_k(caption_emb, emb, FLAGS.top_k))


if __name__ == "__main__":
  app.run(main)
