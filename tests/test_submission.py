"""Top-k retrieval and the DCASE submission CSV against a brute-force argsort, on small examples; the TensorBoard
retrieval examples built from them (summaries)."""

import csv

import numpy as np
import pytest
import soundfile as sf

from atr_jax.evaluation import SplitEmbeddings
from atr_jax.submission import top_k_clips, write_submission
from atr_jax.summaries import query_indices, write_retrieval_examples
from data_pipelines.features import SAMPLE_RATE


def unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("block_size", [1, 3, None])
@pytest.mark.parametrize("k", [1, 4, 15])
def test_top_k_matches_full_argsort(k, block_size):
  rng = np.random.default_rng(k)
  text, audio = unit(rng.normal(size=(9, 6))), unit(rng.normal(size=(15, 6)))
  expected = np.argsort(-(text @ audio.T), axis=1, kind="stable")[:, :k]
  np.testing.assert_array_equal(top_k_clips(text, audio, k, block_size), expected)


def test_equal_scores_are_ordered_by_clip_index():
  audio = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
  text = np.array([[1.0, 0.0]])
  np.testing.assert_array_equal(top_k_clips(text, audio, 3), [[1, 2, 3]])


def test_submission_csv(tmp_path):
  rng = np.random.default_rng(0)
  audio = unit(rng.normal(size=(14, 8)))
  file_names = [f"clip_{i:02d}.wav" for i in range(14)]
  captions = ["a dog barks, then a car passes", 'rain "falls" on a roof', "birds sing"]  # any caption list
  text = unit(audio[[3, 7, 11]] + 0.1 * rng.normal(size=(3, 8)))
  path = tmp_path / "out" / "submission.csv"
  write_submission(str(path), captions, text, audio, file_names, block_size=2)
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["caption"] + [f"fname_{i}" for i in range(1, 11)]
  assert [row[0] for row in rows[1:]] == captions
  expected = np.argsort(-(text @ audio.T), axis=1)[:, :10]
  for row, clips in zip(rows[1:], expected):
    assert row[1:] == [file_names[c] for c in clips]
  assert [row[1] for row in rows[1:]] == ["clip_03.wav", "clip_07.wav", "clip_11.wav"]


def test_bad_inputs_are_rejected(tmp_path):
  audio, text = np.ones((12, 4)), np.ones((2, 4))
  names = [f"{i}.wav" for i in range(12)]
  with pytest.raises(ValueError, match="2 captions but"):
    write_submission(str(tmp_path / "s.csv"), ["a", "b"], np.ones((3, 4)), audio, names)
  with pytest.raises(ValueError, match="file names"):
    write_submission(str(tmp_path / "s.csv"), ["a", "b"], text, audio, names[:5])
  with pytest.raises(ValueError, match="number of clips"):
    write_submission(str(tmp_path / "s.csv"), ["a", "b"], text, audio[:9], names[:9])
  with pytest.raises(ValueError, match="same D"):
    top_k_clips(text, np.ones((12, 3)), 2)


class RecordingWriter:
  def __init__(self):
    self.texts, self.audios = {}, {}

  def write_texts(self, step, texts):
    self.texts.update({(step, k): v for k, v in texts.items()})

  def write_audios(self, step, audios, *, sample_rate):
    assert sample_rate == SAMPLE_RATE
    self.audios.update({(step, k): v for k, v in audios.items()})


def test_retrieval_examples_text_and_top_hit_audio(tmp_path):
  rng = np.random.default_rng(3)
  audio = unit(rng.normal(size=(6, 8)))
  clip_ids = np.repeat(np.arange(6), 2)
  text = unit(audio[clip_ids] + 0.05 * rng.normal(size=(12, 8)))
  text[11] = audio[2]  # the last query's true clip is 5, but clip 2 wins: a miss at rank 1
  file_names = [f"c{i}.wav" for i in range(6)]
  emb = SplitEmbeddings(
    audio=audio,
    text=text,
    caption_clip_ids=clip_ids,
    captions=[f"caption {i}" for i in range(12)],
    file_names=file_names,
  )
  (tmp_path / "validation").mkdir()
  tones = {i: 0.1 * (i + 1) * np.sin(np.arange(SAMPLE_RATE) * 0.01 * (i + 1)) for i in range(6) if i != 0}
  for i, tone in tones.items():  # c0.wav is missing: its audio stays silent, with a warning
    sf.write(tmp_path / "validation" / file_names[i], tone, SAMPLE_RATE, subtype="FLOAT")
  writer = RecordingWriter()
  write_retrieval_examples(
    writer, 7, emb, dataset="clotho", raw_dir=str(tmp_path), split="validation", num_queries=3, audio_seconds=2.0
  )
  queries = query_indices(12, 3)
  np.testing.assert_array_equal(queries, [0, 6, 11])
  text_summary = writer.texts[(7, "validation/retrieval_examples")]
  for q in queries:
    assert f"**caption {q}** (true clip: `c{clip_ids[q]}.wav`)" in text_summary
  assert text_summary.count("1. `") == 3 and text_summary.count("5. `") == 3
  assert text_summary.count("(true clip)") == 3
  assert text_summary.count("true clip in the top 5: yes") == 3
  assert "1. `c2.wav`" in text_summary.split("**caption 11**")[1]
  clips = writer.audios[(7, "validation/top_hits")]
  assert clips.shape == (3, 2 * SAMPLE_RATE, 1)
  assert not clips[0].any()  # top hit c0.wav cannot be read
  np.testing.assert_allclose(clips[1, :SAMPLE_RATE, 0], tones[3], atol=1e-6)  # caption 6 -> clip 3
  np.testing.assert_allclose(clips[2, :SAMPLE_RATE, 0], tones[2], atol=1e-6)  # caption 11 -> clip 2
  assert not clips[1, SAMPLE_RATE:].any()  # zero-padded to 2 s
