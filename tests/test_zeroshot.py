"""Tests of atr_jax.zeroshot: per-fold accuracy and prompt averaging against numpy, the ESC-50 / UrbanSound8K / CSV
readers and their errors, the CLI (with a stand-in retriever, and end to end on the tiny trained workdir), and the
synthetic ESC-50-layout output read back."""

import csv
import os

import numpy as np
import pytest
from tiny_run import tensorboard_scalars

import atr_jax
from atr_jax import zeroshot
from data_pipelines import synthetic


def _write_csv(path, header, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows([header, *rows])
  return str(path)


def test_accuracy_per_fold_and_mean_over_folds():
  class_emb = np.eye(3)
  audio_emb = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.0, 0.3, 0.6], [0.1, 0.0, 0.8], [0.3, 0.2, 0.5]])
  labels = np.array([0, 1, 0, 2, 1])  # Predicted: 0, 1, 2, 2, 2.
  folds = np.array([1, 1, 1, 3, 3])
  accuracy = zeroshot.zeroshot_accuracy(audio_emb, labels, folds, class_emb)
  assert accuracy == pytest.approx({"fold1": 2 / 3, "fold3": 1 / 2, "mean": (2 / 3 + 1 / 2) / 2})
  assert accuracy["mean"] != pytest.approx(3 / 5)  # The mean over folds, not over clips.
  with pytest.raises(ValueError, match="5 clip embeddings, 4 labels"):
    zeroshot.zeroshot_accuracy(audio_emb, labels[:4], folds, class_emb)


def test_class_embedding_is_the_normalised_mean_over_prompts():
  rng = np.random.default_rng(0)
  table = {}

  def embed_texts(texts):
    for text in texts:
      table.setdefault(text, rng.standard_normal(4) / 2)
    return np.stack([table[text] for text in texts])

  prompts = ["the sound of a {}", "{} can be heard"]
  class_emb = zeroshot.class_embeddings(embed_texts, ["dog", "crying baby"], prompts)
  for row, name in enumerate(["dog", "crying baby"]):
    mean = (table[f"the sound of a {name}"] + table[f"{name} can be heard"]) / 2
    np.testing.assert_allclose(class_emb[row], mean / np.linalg.norm(mean), rtol=1e-6)
  with pytest.raises(ValueError, match="one"):
    zeroshot.class_embeddings(embed_texts, ["dog"], ["no placeholder"])


def test_esc50_reader_cleans_class_names(tmp_path):
  header = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
  rows = [["1-1-A-0.wav", 1, 0, "dog", "True", 1, "A"], ["2-2-A-20.wav", 2, 20, "crying_baby", "False", 2, "A"]]
  _write_csv(tmp_path / "meta" / "esc50.csv", header, rows)
  dataset = zeroshot.read_dataset("esc50", str(tmp_path))
  assert dataset.class_names == ["crying baby", "dog"]
  assert dataset.labels.tolist() == [1, 0] and dataset.folds.tolist() == [1, 2]
  assert dataset.paths == [str(tmp_path / "audio" / "1-1-A-0.wav"), str(tmp_path / "audio" / "2-2-A-20.wav")]


def test_urbansound8k_reader_finds_audio_in_fold_folders(tmp_path):
  header = ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"]
  rows = [["100032-3-0-0.wav", 100032, 0.0, 0.3, 1, 5, 3, "dog_bark"], ["1-1-0-0.wav", 1, 0, 4, 2, 10, 2, "siren"]]
  _write_csv(tmp_path / "metadata" / "UrbanSound8K.csv", header, rows)
  dataset = zeroshot.read_urbansound8k(str(tmp_path))
  assert dataset.class_names == ["dog bark", "siren"] and dataset.folds.tolist() == [5, 10]
  assert dataset.paths[1] == str(tmp_path / "audio" / "fold10" / "1-1-0-0.wav")


def test_csv_reader_relative_and_absolute_files_and_optional_fold(tmp_path):
  path = _write_csv(tmp_path / "labels.csv", ["file", "label"], [["a.wav", "cat"], ["/data/b.wav", "dog"]])
  dataset = zeroshot.read_csv(path)
  assert dataset.paths == [str(tmp_path / "a.wav"), "/data/b.wav"] and dataset.folds.tolist() == [1, 1]
  assert zeroshot.read_csv(path, root="/elsewhere").paths[0] == "/elsewhere/a.wav"
  bad_fold = _write_csv(tmp_path / "bad.csv", ["file", "label", "fold"], [["a.wav", "cat", "one"]])
  with pytest.raises(ValueError, match=r"bad\.csv line 2: 'fold' is 'one'"):
    zeroshot.read_csv(bad_fold)


def test_reader_errors_name_the_file_and_column(tmp_path):
  header = ["filename", "fold", "target", "esc10"]  # No 'category'.
  path = _write_csv(tmp_path / "meta" / "esc50.csv", header, [["1-1-A-0.wav", 1, 0, "True"]])
  with pytest.raises(ValueError, match=rf"{path}: no column 'category'"):
    zeroshot.read_esc50(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="UrbanSound8K.csv does not exist"):
    zeroshot.read_urbansound8k(str(tmp_path))
  with pytest.raises(ValueError, match="unknown zero-shot dataset 'audioset'"):
    zeroshot.read_dataset("audioset", str(tmp_path))


class _StandInRetriever:
  """Embeds a caption or an existing file as the one-hot vector of the first class name it contains (a file's name
  holds its class, and 'cat_as_dog' files pose as dogs); missing files are skipped as the real extractor does."""

  NAMES = ("cat", "dog", "bird")

  def __init__(self, workdir):
    self.workdir = workdir

  def _one_hot(self, text):
    return np.eye(3)[min(self.NAMES.index(n) for n in self.NAMES if n in text.replace("cat_as_", ""))]

  def embed_text(self, texts):
    return np.stack([self._one_hot(text) for text in texts])

  def embed_audio_files(self, paths, batch_size, workers=None):
    kept = [path for path in paths if os.path.exists(path)]
    skipped = [(path, "missing_audio") for path in paths if not os.path.exists(path)]
    return np.stack([self._one_hot(os.path.basename(p)) for p in kept]), kept, skipped


def test_cli_prints_per_fold_accuracy_and_reports_skipped_files(tmp_path, monkeypatch, capsys):
  rows = [["cat1.wav", "cat", 1], ["dog1.wav", "dog", 1], ["cat_as_dog.wav", "cat", 2], ["bird2.wav", "bird", 2]]
  for name, _, _ in rows:
    (tmp_path / name).write_bytes(b"")
  rows.append(["gone.wav", "dog", 2])
  path = _write_csv(tmp_path / "labels.csv", ["file", "label", "fold"], rows)
  monkeypatch.setattr(atr_jax, "load", _StandInRetriever)
  zeroshot.main(["zeroshot", "--workdir=W", f"--csv={path}", "--prompts=a {} sound", "--prompts={}"])
  out, err = capsys.readouterr()
  assert f"skipped {tmp_path / 'gone.wav'}: missing_audio" in err
  assert out.splitlines() == [
    "4 clips (1 skipped), 3 classes",
    "  fold1  100.00 %",
    "  fold2   50.00 %",
    "   mean   75.00 %",
  ]

  with pytest.raises(SystemExit):
    zeroshot.main(["zeroshot", "--workdir=W", "--dataset=audioset", "--root=R"])
  assert "invalid choice: 'audioset'" in capsys.readouterr().err


def test_synthetic_esc50_output_reads_as_one_class_per_event_kind(tmp_path):
  synthetic.write_esc50(str(tmp_path / "esc"), clips_per_fold=1, duration_s=1.5)
  dataset = zeroshot.read_esc50(str(tmp_path / "esc"))
  assert dataset.class_names == sorted(synthetic.KINDS)  # "rising_whistle" is read back as "rising whistle".
  assert np.bincount(dataset.labels).tolist() == [5] * len(synthetic.KINDS)
  assert sorted(dataset.folds.tolist()) == sorted(list(range(1, 6)) * len(synthetic.KINDS))
  assert all(os.path.isfile(path) for path in dataset.paths)


@pytest.mark.slow
def test_training_logs_the_accuracy_the_cli_prints_for_its_checkpoint(tiny_trained, capsys):
  # The tiny_trained run evaluates zero-shot on a 35-clip synthetic ESC-50 set at each validation: the values it
  # logged at the checkpoint the CLI loads (the best) are the CLI's, fold by fold.
  config, workdir = tiny_trained
  best = atr_jax.load(workdir).step
  logged = {
    key: tensorboard_scalars(workdir, f"zeroshot/{key}") for key in [f"fold{fold}" for fold in range(1, 6)] + ["mean"]
  }
  assert all(sorted(values) == [7, 14] for values in logged.values()), logged  # Both epoch ends (7 steps each).
  capsys.readouterr()
  zeroshot.main(
    ["zeroshot", f"--workdir={workdir}", "--dataset=esc50", f"--root={config.eval.zeroshot.root}", "--workers=1"]
    + [f"--batch_size={config.eval.batch_size}"]
  )
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == f"35 clips (0 skipped), {len(synthetic.KINDS)} classes"
  printed = {line.split()[0]: float(line.split()[1]) for line in lines[1:]}
  assert printed == {key: round(100 * values[best], 2) for key, values in logged.items()}
