"""Retrieval for users, from a trained workdir (its best checkpoint and the config saved beside it).

  python -m atr_jax.retrieve index --workdir RUN --audio_dir DIR --index INDEX   # embed every audio file of DIR
  python -m atr_jax.retrieve text  --workdir RUN --index INDEX --query "a dog barks" [--top_k 10]
  python -m atr_jax.retrieve text  --workdir RUN --audio_dir DIR --query "a dog barks"  # no index: embeds DIR
  python -m atr_jax.retrieve audio --workdir RUN --audio FILE --captions CAPTIONS.txt [--top_k 5]
  python -m atr_jax.retrieve submission --workdir RUN --audio_dir DIR --captions retrieval_captions.csv --out F.csv
  python -m atr_jax.retrieve embed-train --workdir RUN --out RUN/teacher  # a teacher folder for config.distill

The model, its embeddings and the index format are `atr_jax.api`'s (`atr_jax.load`), the one path that zero-shot and
the search page use too. An index is a folder holding `embeddings.npy` (float32 [N, D], unit rows) and `files.json`
(the N paths, relative to the indexed folder, the indexed folder, and the model that made them:
`model_identity.ModelIdentity.record()`). `text --index` stops with an error naming both models, and the command that
rebuilds the index, when the index was made by another model than --workdir's (another checkpoint step or model
config fingerprint; an index written before fingerprints is checked by step alone, with a warning). Clips are
embedded whole, any length, with padding masked inside the audio tower, so an embedding is the same whether a file is
embedded alone or in a batch. Audio files stream through in chunks of CHUNK_BATCHES batches
(`api.Model.embed_audio_files`), written to a work folder (`INDEX.partial` for `index`), so memory holds one chunk of
clips however many files there are, and a killed `index` run resumes after its last written chunk. Audio files that
cannot be decoded or are too short are reported and skipped.
"""

from atr_jax import xla_flags

xla_flags.set_defaults()  # Before jax is imported.

import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from atr_jax import console  # noqa: E402

if __name__ == "__main__":
  console.quiet_tensorflow(sys.argv)  # Before TensorFlow loads (with api): --verbosity=1 shows its C++ lines.

from atr_jax import api, distillation, model_identity  # noqa: E402
from atr_jax.api import CHUNK_BATCHES, check_index_matches, read_index, write_index  # noqa: E402
from atr_jax.submission import write_submission  # noqa: E402
from data_pipelines import datasets, features, input_pipeline  # noqa: E402


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


def index_folder(
  retriever: api.Model, audio_dir: str, index_dir: str, batch_size: int, workers: int | None = None
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


def embed_training_set(retriever: api.Model, out: str) -> dict:
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
    counts = embed_training_set(api.Model(FLAGS.workdir), FLAGS.out)
    print(f"wrote the embeddings of {counts['clips']} training clips and {counts['captions']} captions to {FLAGS.out}")
  elif command == "index":
    _require("audio_dir", "index")
    kept, skipped = index_folder(
      api.Model(FLAGS.workdir), FLAGS.audio_dir, FLAGS.index, FLAGS.batch_size, FLAGS.workers
    )
    _report_skipped(skipped)
    print(f"indexed {len(kept)} files ({len(skipped)} skipped) into {FLAGS.index}")
  elif command == "text":
    _require("query")
    if not (FLAGS.index or FLAGS.audio_dir):
      raise app.UsageError("the text command needs --index (made by the index command) or --audio_dir")
    if FLAGS.index:
      embeddings, files = _read_checked_index(FLAGS.index, FLAGS.workdir)
    retriever = api.Model(FLAGS.workdir)
    if not FLAGS.index:  # No index: embed the folder now.
      embeddings, kept, skipped = retriever.embed_audio_files(
        audio_files(FLAGS.audio_dir), FLAGS.batch_size, workers=FLAGS.workers
      )
      _report_skipped(skipped)
      files = [os.path.relpath(p, FLAGS.audio_dir) for p in kept]
    for query, emb in zip(FLAGS.query, retriever.embed_text(FLAGS.query)):
      _print_ranking(query, files, *api.ranked_top_k(embeddings, emb, FLAGS.top_k))
  elif command == "submission":
    _require("audio_dir", "captions", "out")
    captions = _read_nonempty_captions(FLAGS.captions)
    retriever = api.Model(FLAGS.workdir)
    embeddings, kept, skipped = retriever.embed_audio_files(
      audio_files(FLAGS.audio_dir), FLAGS.batch_size, workers=FLAGS.workers
    )
    _report_skipped(skipped)
    write_submission(
      FLAGS.out, captions, retriever.embed_text(captions), embeddings, [os.path.basename(p) for p in kept]
    )
    print(f"wrote the top 10 of {len(kept)} clips for {len(captions)} captions to {FLAGS.out}")
  else:
    _require("audio", "captions")
    captions = _read_nonempty_captions(FLAGS.captions)
    retriever = api.Model(FLAGS.workdir)
    caption_emb = retriever.embed_text(captions)
    embeddings, kept, skipped = retriever.embed_audio_files(FLAGS.audio, FLAGS.batch_size, workers=FLAGS.workers)
    _report_skipped(skipped)
    for path, emb in zip(kept, embeddings):
      _print_ranking(path, captions, *api.ranked_top_k(caption_emb, emb, FLAGS.top_k))


if __name__ == "__main__":
  app.run(main)
