"""The moment-retrieval command line (`python -m atr_jax.moments`), the sliding-window baseline and the submission
format: a tiny train, evaluate, predict and submission end to end on the shared tiny dual encoder, and the user
errors as one line with a non-zero exit."""

import contextlib
import io
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
import soundfile as sf

from atr_jax.moments import __main__ as command
from atr_jax.moments import sliding_window
from atr_jax.moments import train as moment_train
from configs.base import get_base_config


def _run(capsys, *argv) -> tuple[str, str]:
  command.main(list(argv))
  captured = capsys.readouterr()
  return captured.out, captured.err


def _error(capsys, *argv) -> str:
  with pytest.raises(SystemExit) as exit_info:
    command.main(list(argv))
  assert exit_info.value.code == 1
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
  return err


def _baseline_config(**changes) -> ml_collections.ConfigDict:
  config = get_base_config().moments.sliding_window
  config.update(changes)
  return config


def test_window_scores_are_the_inside_outside_contrast_of_every_window():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=13)
  found = sliding_window.window_scores(scores, (1, 3, 5, 20))
  expected = []
  for length in (1, 3, 5, 13):  # 20 frames: the whole recording.
    for first in range(13 - length + 1):
      inside = scores[first : first + length]
      outside = np.concatenate([scores[:first], scores[first + length :]])
      expected.append((first, first + length, inside.mean() - (outside.mean() if len(outside) else 0.0)))
  np.testing.assert_allclose(found, np.array(expected), rtol=1e-12, atol=1e-12)


def test_sliding_window_finds_the_hand_made_moments():
  """Two events in a 20-frame recording at 0.5 s hop: frames 4-6 match the query strongly, frames 12-13 weakly;
  the rest match nothing. The best moment is exactly frames 4-6, the second frames 12-13 (the parts of the first
  merged into it), and no later window lies half inside an earlier one."""
  dim = 6
  query = np.eye(dim)[0]
  frames = np.tile(np.eye(dim)[1], (20, 1))
  frames[4:7] = np.eye(dim)[0]
  frames[12:14] = (np.eye(dim)[0] + np.eye(dim)[1]) / np.sqrt(2)
  positions = np.stack([np.arange(20), np.arange(1, 21)], -1) / 20
  features = {"rec": np.concatenate([frames, positions], -1).astype(np.float32)}

  class Query:
    qid, vid, duration = "q", "rec", 9.8  # The last frame ends past the duration: clamped.

  (prediction,) = sliding_window.predict(features, {"q": query}, [Query], 0.5, _baseline_config(num_windows=4))
  windows = np.array(prediction["pred_relevant_windows"])
  np.testing.assert_allclose(windows[0, :2], [2.0, 3.5])
  np.testing.assert_allclose(windows[1, :2], [6.0, 7.0])
  assert list(windows[:, 2]) == sorted(windows[:, 2], reverse=True)
  assert windows[:, 1].max() <= 9.8
  for k in range(1, len(windows)):
    assert sliding_window.covered(windows[k, :2], windows[:k, :2]).max() < 0.5


def test_submission_windows_drop_scores_clamp_and_round():
  windows = [[-3.2, 10.5, 0.9], [299.6, 312.0, 0.5], [2.49, 2.51, 0.1], [7.5, 8.4999, 0.05]]
  assert command.submission_windows(windows) == [[0, 11], [300, 300], [2, 3], [8, 8]]
  assert command.submission_windows([]) == []


def test_user_errors_are_one_line(tmp_path, capsys):
  assert "not a moment workdir" in _error(
    capsys, "evaluate", "--workdir", str(tmp_path), "--annotations", "a.jsonl", "--audio_dir", str(tmp_path)
  )
  assert "no such config file" in _error(capsys, "train", "--config", str(tmp_path / "none.py"), "--workdir", "w")
  config_file = tmp_path / "config.py"
  config_file.write_text("from configs.base import get_base_config\n\ndef get_config():\n  return get_base_config()\n")
  assert "encoder_workdir is empty" in _error(capsys, "train", "--config", str(config_file), "--workdir", "w")
  err = _error(
    capsys, "train", "--config", str(config_file), "--workdir", "w", f"--config.moments.encoder_workdir={tmp_path}"
  )
  assert "holds no trained atr-jax run" in err
  assert "'nope'" in _error(capsys, "train", "--config", str(config_file), "--workdir", "w", "--config.moments.nope=1")


@pytest.fixture(scope="module")
def moment_run(tiny_trained, tmp_path_factory):
  """(moment workdir, moment data folder, train's stdout) of a tiny moment model trained through the command on a
  set synthesised from the tiny run's clips."""
  config, encoder = tiny_trained
  tmp_path = tmp_path_factory.mktemp("moments")
  config_file = tmp_path / "config.py"
  data_dir = tmp_path / "moment_data"
  config_file.write_text(
    "from configs.base import get_base_config\n\n\n"
    "def get_config():\n"
    "  config = get_base_config()\n"
    f"  config.data.raw_dir = {config.data.raw_dir!r}\n"
    f"  config.moments.encoder_workdir = {encoder!r}\n"
    f"  config.moments.data.dir = {str(data_dir)!r}\n"
    "  config.moments.data.synthesize = True\n"
    "  config.moments.data.synthetic_duration = 6\n"
    "  config.moments.model.update(hidden_dim=16, num_heads=2, ffn_dim=32, num_queries=4)\n"
    "  config.moments.train.update(global_batch_size=8, num_epochs=2, max_frames=4)\n"
    "  return config\n"
  )
  workdir = tmp_path / "run"
  out = io.StringIO()  # capsys is per test; this fixture is per module.
  with contextlib.redirect_stdout(out):
    command.main(["train", "--config", str(config_file), "--workdir", str(workdir)])
  return workdir, data_dir, out.getvalue()


@pytest.mark.slow
def test_train_evaluate_predict_submission(moment_run, capsys, tmp_path):
  workdir, data_dir, train_out = moment_run
  assert "synthesising the moment set" in train_out
  assert "sliding window" in train_out and "R1@0.7" in train_out
  saved = json.loads((workdir / command.CONFIG_FILE).read_text())
  assert saved["moments"]["train"]["max_frames"] == 4 and os.path.isabs(saved["encoder_workdir"])

  test_file, audio_dir = str(data_dir / "test.jsonl"), str(data_dir / "test")
  out, _ = _run(capsys, "evaluate", "--workdir", str(workdir), "--annotations", test_file, "--audio_dir", audio_dir)
  results = json.loads((workdir / command.RESULTS_FILE).read_text())
  assert set(command.METRIC_KEYS) <= set(results) and set(results["sliding_window"]) == set(command.METRIC_KEYS)
  row = next(line for line in out.splitlines() if line.startswith("R1@0.7"))
  assert [float(v) for v in row.split()[1:]] == pytest.approx(
    [results["R1@0.7"], results["sliding_window"]["R1@0.7"]], abs=0.006
  )

  # A recording three times the model's 4 frames: segmented and merged, moments anywhere in it.
  rng = np.random.default_rng(0)
  long_audio = tmp_path / "long.wav"
  sf.write(long_audio, rng.normal(0, 0.1, 32000 * 12).astype(np.float32), 32000)
  out, _ = _run(
    capsys, "predict", "--workdir", str(workdir), "--audio", str(long_audio), "--query", "a dog", "--top_k", "3"
  )
  rows = [line.split() for line in out.splitlines()[1:]]
  assert len(rows) == 3
  starts, ends, scores = (np.array([float(r[i]) for r in rows]) for i in (1, 3, 6))  # 'k.  start -  end s  score v'
  assert (starts >= 0).all() and (ends <= 12).all() and (starts < ends).all()
  assert list(scores) == sorted(scores, reverse=True)

  output = tmp_path / "submission.jsonl"
  _run(
    capsys,
    "submission",
    "--workdir",
    str(workdir),
    "--annotations",
    test_file,
    "--audio_dir",
    audio_dir,
    "--output",
    str(output),
  )
  lines = [json.loads(line) for line in output.read_text().splitlines()]
  truth = [json.loads(line) for line in open(test_file)]
  assert [line["qid"] for line in lines] == [q["qid"] for q in truth]
  for line, q in zip(lines, truth):
    assert set(line) == {"qid", "query", "vid", "pred_relevant_windows"} and line["query"] == q["query"]
    windows = np.array(line["pred_relevant_windows"])
    assert (
      1 <= len(windows) <= 4
      and windows.shape[1:] == (2,)
      and windows.dtype.kind == "i"
      and (windows >= 0).all()
      and (windows <= 300).all()
    )

  # moments.init_from: the best parameters come back as they are; another model shape is refused by name.
  params = moment_train.restore_best_params(str(workdir))
  restored = moment_train.initial_params(str(workdir), params, None)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match=r"moments.init_from=.*parameter .* is \("):
    moment_train.initial_params(str(workdir), jax.tree.map(lambda x: np.zeros(x.shape + (1,)), params), None)

  err = _error(
    capsys, "evaluate", "--workdir", str(workdir), "--annotations", str(tmp_path / "x.jsonl"), "--audio_dir", audio_dir
  )
  assert "x.jsonl: no such file" in err
  assert "no such file" in _error(capsys, "predict", "--workdir", str(workdir), "--audio", "none.wav", "--query", "a")
