"""Zero-shot audio classification with a trained workdir (SPEC section 11): each class name goes into one or more
prompts, a class embedding is the L2-normalised mean of its prompts' caption embeddings, and a clip is given the
class of highest cosine; accuracy is reported per fold and as the mean over folds.

  python -m atr_jax.zeroshot --workdir RUN --dataset esc50 --root ESC-50-master       # meta/esc50.csv, audio/
  python -m atr_jax.zeroshot --workdir RUN --dataset urbansound8k --root UrbanSound8K  # metadata/, audio/foldN/
  python -m atr_jax.zeroshot --workdir RUN --csv labels.csv [--root DIR]  # columns file,label[,fold]
  [--prompts "the sound of a {}" --prompts "{} can be heard"]  [--batch_size 16 --workers N]

The CLI's flags are argparse's, not absl's, so this module can share a process with `atr_jax.main`,
`atr_jax.retrieve` and `data_pipelines.prepare` (whose absl flags use the same names).

During training (`config.eval.zeroshot`), `DuringTraining` decodes the set's clips once and scores the model being
trained at every validation, with the CLI's prompts, class embeddings and accuracy (`accuracy`), and the same
whole-clip embedding (`evaluation.embed_clips`).
"""

from atr_jax import xla_flags

xla_flags.set_defaults()  # Before jax is imported.

import argparse  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import atr_jax  # noqa: E402
from atr_jax import console  # noqa: E402
from atr_jax.models.dual_encoder import l2_normalize  # noqa: E402
from data_pipelines import extraction  # noqa: E402

DEFAULT_PROMPT = "the sound of a {}"


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Labelled clips: `paths[i]` has class `class_names[labels[i]]` and belongs to fold `folds[i]`."""

  paths: list
  labels: np.ndarray  # [N] int.
  folds: np.ndarray  # [N] int.
  class_names: list  # Cleaned ("crying_baby" -> "crying baby"), sorted.


def clean_class_name(name: str) -> str:
  """A label as words for a prompt: "crying_baby" -> "crying baby"."""
  return " ".join(name.replace("_", " ").split())


def read_table(
  csv_path: str, file_column: str, label_column: str, fold_column: str, audio_path, fold_required: bool = True
) -> Dataset:
  """The clips listed in `csv_path`; `audio_path(row)` gives a row's audio file. Every clip is in fold 1 when the
  CSV has no `fold_column` and `fold_required` is False. Errors name the file, and the column or line at fault."""
  if not os.path.isfile(csv_path):
    raise FileNotFoundError(f"{csv_path} does not exist")
  with open(csv_path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    header = reader.fieldnames or []
    if not fold_required and fold_column not in header:
      fold_column = None
    missing = [c for c in (file_column, label_column, fold_column) if c is not None and c not in header]
    if missing:
      raise ValueError(f"{csv_path}: no column {', '.join(map(repr, missing))} (header: {header})")
    rows = list(reader)
  if not rows:
    raise ValueError(f"{csv_path} lists no clip")
  names = [clean_class_name(row[label_column] or "") for row in rows]
  for line, (row, name) in enumerate(zip(rows, names), 2):
    if not name or not row[file_column]:
      raise ValueError(f"{csv_path} line {line}: empty {file_column!r} or {label_column!r}")
  folds = np.ones(len(rows), np.int64)
  if fold_column is not None:
    for i, row in enumerate(rows):
      try:
        folds[i] = int(row[fold_column])
      except (TypeError, ValueError):
        raise ValueError(f"{csv_path} line {i + 2}: {fold_column!r} is {row[fold_column]!r}, not an integer") from None
  class_names = sorted(set(names))
  return Dataset(
    paths=[audio_path(row) for row in rows],
    labels=np.array([class_names.index(name) for name in names], np.int64),
    folds=folds,
    class_names=class_names,
  )


def read_esc50(root: str) -> Dataset:
  """ESC-50: `root/meta/esc50.csv` (filename,fold,target,category,...), audio in `root/audio/`."""
  return read_table(
    os.path.join(root, "meta", "esc50.csv"),
    "filename",
    "category",
    "fold",
    lambda row: os.path.join(root, "audio", row["filename"]),
  )


def read_urbansound8k(root: str) -> Dataset:
  """UrbanSound8K: `root/metadata/UrbanSound8K.csv` (slice_file_name,fsID,start,end,salience,fold,classID,class),
  audio in `root/audio/fold{fold}/`."""
  return read_table(
    os.path.join(root, "metadata", "UrbanSound8K.csv"),
    "slice_file_name",
    "class",
    "fold",
    lambda row: os.path.join(root, "audio", f"fold{row['fold']}", row["slice_file_name"]),
  )


def read_csv(csv_path: str, root: str | None = None) -> Dataset:
  """A CSV with columns `file,label` and optionally `fold`; relative files are below `root` (default: the CSV's
  folder)."""
  root = os.path.dirname(os.path.abspath(csv_path)) if root is None else root
  return read_table(csv_path, "file", "label", "fold", lambda row: os.path.join(root, row["file"]), fold_required=False)


DATASETS = {"esc50": read_esc50, "urbansound8k": read_urbansound8k}


def read_dataset(name: str, root: str) -> Dataset:
  if name not in DATASETS:
    raise ValueError(f"unknown zero-shot dataset {name!r}; known: {sorted(DATASETS)} (or a CSV: read_csv)")
  return DATASETS[name](root)


def check_prompts(prompts, name: str) -> None:
  """A ValueError naming `name` unless `prompts` is a non-empty sequence of prompts holding "{}" once each."""
  if not prompts or any(prompt.count("{}") != 1 for prompt in prompts):
    raise ValueError(
      f'{name}={tuple(prompts)!r}: give a tuple of prompts, each with one "{{}}" where the class name goes, e.g. '
      '("the sound of a {}",)'
    )


def class_embeddings(embed_texts: Callable[[list], np.ndarray], class_names: list, prompts: list) -> np.ndarray:
  """[C, D]: per class, the L2-normalised mean over `prompts` (each holding "{}" once, replaced by the class name)
  of `embed_texts`' caption embeddings."""
  check_prompts(prompts, "prompts")
  texts = [prompt.replace("{}", name) for name in class_names for prompt in prompts]
  embeddings = np.asarray(embed_texts(texts)).reshape(len(class_names), len(prompts), -1)
  return np.asarray(l2_normalize(embeddings.mean(axis=1)))


def zeroshot_accuracy(audio_emb, labels, folds, class_emb) -> dict[str, float]:
  """{"fold{f}": accuracy on the clips of fold f for each fold, "mean": the unweighted mean of those} of predicting
  each clip (row of `audio_emb`) as the class (row of `class_emb`) of highest dot product (cosine for unit rows)."""
  audio_emb, labels, folds = np.asarray(audio_emb), np.asarray(labels), np.asarray(folds)
  if not len(audio_emb) == len(labels) == len(folds) or not len(labels):
    raise ValueError(f"{len(audio_emb)} clip embeddings, {len(labels)} labels and {len(folds)} folds")
  correct = np.argmax(audio_emb @ np.asarray(class_emb).T, axis=1) == labels
  accuracy = {f"fold{fold}": float(np.mean(correct[folds == fold])) for fold in np.unique(folds)}
  return {**accuracy, "mean": float(np.mean(list(accuracy.values())))}


def accuracy(
  audio_emb: np.ndarray, kept: list, dataset: Dataset, embed_texts: Callable[[list], np.ndarray], prompts: list
) -> dict[str, float]:
  """`zeroshot_accuracy` of the clip embeddings `audio_emb` of the clips `kept` (paths of `dataset`, those that
  could be read), against the class embeddings of `prompts`."""
  if not kept:
    raise ValueError(f"no clip of the {len(dataset.paths)} listed could be read")
  row_of = {path: row for row, path in enumerate(dataset.paths)}
  rows = np.array([row_of[path] for path in kept])
  class_emb = class_embeddings(embed_texts, dataset.class_names, prompts)
  return zeroshot_accuracy(audio_emb, dataset.labels[rows], dataset.folds[rows], class_emb)


def evaluate(model, dataset: Dataset, prompts: list, batch_size: int = 16, workers: int | None = None):
  """(zeroshot accuracy of `model`'s (an `atr_jax.api.Model`) embeddings on the readable clips of `dataset`,
  [(path, reason)] of the skipped clips)."""
  audio_emb, kept, skipped = model.embed_audio_files(dataset.paths, batch_size, workers=workers)
  if not kept:
    raise ValueError(f"no clip of the {len(dataset.paths)} listed could be read (first: {skipped[0]})")
  return accuracy(audio_emb, kept, dataset, model.embed_text, prompts), skipped


def enabled(zeroshot_config: ml_collections.ConfigDict) -> bool:
  """Whether `config.eval.zeroshot` names a set (a dataset or a CSV)."""
  return bool(zeroshot_config.dataset or zeroshot_config.csv)


def dataset_from_config(zeroshot_config: ml_collections.ConfigDict) -> Dataset:
  """The labelled clips `config.eval.zeroshot` names: `dataset` (esc50, urbansound8k) in the folder `root`, or
  `csv` (file,label[,fold]; relative files below `root`, default the CSV's folder). A synthetic ESC-50-layout set is
  written to `root` first when `generate_synthetic` is set and `root` does not exist."""
  root = os.path.expanduser(zeroshot_config.root) if zeroshot_config.root else None
  if zeroshot_config.dataset and zeroshot_config.csv:
    raise ValueError("config.eval.zeroshot: set either dataset (with root) or csv, not both")
  if zeroshot_config.dataset:
    if root is None:
      raise ValueError(f"config.eval.zeroshot.dataset={zeroshot_config.dataset!r} needs config.eval.zeroshot.root")
    if zeroshot_config.generate_synthetic:
      _generate_synthetic_esc50(zeroshot_config.dataset, root)
    if not os.path.isdir(root):
      raise FileNotFoundError(f"config.eval.zeroshot.root={zeroshot_config.root!r}: {root} does not exist")
    return read_dataset(zeroshot_config.dataset, root)
  return read_csv(os.path.expanduser(zeroshot_config.csv), root)


def _generate_synthetic_esc50(dataset: str, root: str) -> None:
  """Process 0 writes the synthetic ESC-50-layout set to `root` unless it exists; the others wait for it."""
  if dataset != "esc50":
    raise ValueError(f"config.eval.zeroshot.generate_synthetic writes the esc50 layout, not {dataset!r}")
  if jax.process_index() == 0 and not os.path.isdir(root):
    from data_pipelines import synthetic

    synthetic.write_esc50(root)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("atr_jax synthetic zero-shot set")


class DuringTraining:
  """Zero-shot accuracy of the model being trained on the set `config.eval.zeroshot` names, its clips decoded once
  (in the stored form `form_name`, config.data.audio_feature, held in memory; unreadable clips reported once and
  left out)."""

  def __init__(self, zeroshot_config: ml_collections.ConfigDict, form_name: str, workers: int | None = None):
    self.dataset = dataset_from_config(zeroshot_config)
    self.prompts = list(zeroshot_config.prompts)
    with tempfile.TemporaryDirectory(prefix="atr_jax_zeroshot_") as cache_dir:
      with extraction.Extractor(cache_dir, workers, form_name) as extractor:
        outcomes = extractor.run(self.dataset.paths, "zero-shot clips")
      self.clips = [extraction.load_clip(o.cache_path) for o in outcomes if o.cache_path]
    self.kept = [path for path, o in zip(self.dataset.paths, outcomes) if o.cache_path]
    for path, o in zip(self.dataset.paths, outcomes):
      if not o.cache_path:
        logging.warning("zero-shot set: skipped %s (%s)", path, o.detail or o.reason)
    if not self.kept:
      raise ValueError(f"config.eval.zeroshot: no clip of the {len(self.dataset.paths)} listed could be read")

  def __call__(self, embed_clips: Callable[[list], np.ndarray], embed_texts: Callable[[list], np.ndarray]):
    """{"fold{f}": ..., "mean": ...} with the model that `embed_clips` (stored clips -> embeddings) and
    `embed_texts` apply."""
    return accuracy(embed_clips(self.clips), self.kept, self.dataset, embed_texts, self.prompts)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m atr_jax.zeroshot", description="Zero-shot classification accuracy of a trained workdir."
  )
  parser.add_argument("--workdir", required=True, help="training workdir (holds config.json and checkpoints/)")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--dataset", choices=sorted(DATASETS), help="a benchmark in its own layout below --root")
  source.add_argument("--csv", help="a CSV with columns file,label[,fold] (relative files below --root)")
  parser.add_argument("--root", help="the dataset folder (--dataset) or the folder of relative files (--csv)")
  parser.add_argument(
    "--prompts",
    action="append",
    help=f'a prompt with "{{}}" for the class name (repeat for several; default "{DEFAULT_PROMPT}")',
  )
  parser.add_argument("--batch_size", type=int, default=16, help="audio files per embedding batch")
  parser.add_argument("--workers", type=int, default=None, help="audio decoding processes (default: one per core)")
  return parser


def main(argv: list) -> None:
  """Runs the command line `argv` (program name first): prints the accuracies."""
  parser = _parser()
  args = parser.parse_args(argv[1:])
  if args.dataset and not args.root:
    parser.error("--dataset needs --root (the dataset folder)")
  dataset = read_dataset(args.dataset, args.root) if args.dataset else read_csv(args.csv, args.root)
  scores, skipped = evaluate(
    atr_jax.load(args.workdir), dataset, args.prompts or [DEFAULT_PROMPT], args.batch_size, args.workers
  )
  for path, reason in skipped:
    print(f"skipped {path}: {reason}", file=sys.stderr)
  print(f"{len(dataset.paths) - len(skipped)} clips ({len(skipped)} skipped), {len(dataset.class_names)} classes")
  for key, value in scores.items():
    print(f"{key:>7s}  {100 * value:6.2f} %")


def _absl_defaults(argv: list) -> list:
  """app.run's flag parser: absl's own flags keep their defaults; `main` parses the command line."""
  flags.FLAGS(argv[:1])
  return argv


if __name__ == "__main__":
  console.quiet_tensorflow(sys.argv)  # Before TensorFlow loads (with the model).
  app.run(main, flags_parser=_absl_defaults)
