"""Clotho TFDS builder, `prepare` and the tf.data pipelines, on a small Clotho-layout fixture built here.

The fixture mixes 44.1 kHz and 32 kHz wavs of different lengths, a stereo file, a broken, a missing and a too-short
wav, a caption-less row, and CSVs in UTF-8, latin-1 and cp1252.
"""

import collections
import csv
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import soundfile as sf

from data_pipelines import audio_forms, captions, clip_builder, clotho, extraction, features, input_pipeline

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FRAMES = 150
# file name -> (sample rate, seconds, channels); sorted names give the clip ids.
GOOD_AUDIO = {
  "development": {
    "d0.wav": (44100, 3.0, 1),
    "d1.wav": (32000, 2.0, 1),
    "d2.wav": (44100, 1.5, 2),
    "d3.wav": (32000, 0.5, 1),
    "d5.wav": (44100, 1.0, 1),
    "d6.wav": (32000, 2.5, 1),
    "d7.wav": (44100, 1.2, 1),
    "d8.wav": (32000, 2.8, 1),
  },
  "validation": {
    "v0.wav": (44100, 2.0, 1),
    "v1.wav": (32000, 1.0, 1),
    "v2.wav": (32000, 2.2, 1),
    "v3.wav": (44100, 0.8, 1),
  },
  "evaluation": {"e0.wav": (32000, 2.0, 1), "e1.wav": (44100, 1.0, 1), "e2.wav": (32000, 0.7, 1)},
}
CAPTION_COUNTS = {"validation": {"v0.wav": 5, "v1.wav": 4, "v2.wav": 2, "v3.wav": 1}}
SPECIAL_CAPTIONS = {
  "d1.wav": 'a "quoted", comma caption',
  "d5.wav": "A café's naïve façade: “smart” quotes!",
  "v0.wav": "café naïve façade",
  "e1.wav": "a “smart” quote — and a dash",
}
CSV_ENCODINGS = {"development": "utf-8", "validation": "latin-1", "evaluation": "cp1252"}
# Rows that must be skipped (garbage bytes, no file, empty captions, 100 samples): name -> reported reason.
BAD_ROWS = {
  "d4_broken.wav": "unreadable_audio",
  "d4_missing.wav": "missing_audio",
  "d4_nocaption.wav": "no_caption",
  "d9_short.wav": "too_short",
}


def _captions(split: str, name: str) -> list[str]:
  count = CAPTION_COUNTS.get(split, {}).get(name, 5)
  captions = [f"caption {k} of {name} in {split}" for k in range(count)]
  if name in SPECIAL_CAPTIONS:
    captions[0] = SPECIAL_CAPTIONS[name]
  return captions


def _write_wav(path: str, rate: int, seconds: float, channels: int, rng: np.random.Generator) -> None:
  wave = 0.3 * rng.standard_normal((int(rate * seconds), channels)).astype(np.float32)
  sf.write(path, wave, rate, subtype="PCM_16")


def _write_csv(path: str, rows: list[list[str]], encoding: str) -> None:
  with open(path, "w", newline="", encoding=encoding) as f:
    writer = csv.writer(f)
    writer.writerow(["file_name"] + [f"caption_{k}" for k in range(1, 6)])
    writer.writerows(rows)


def _make_raw_dir(raw_dir: str) -> None:
  rng = np.random.default_rng(1234)
  for split, audio in GOOD_AUDIO.items():
    os.makedirs(os.path.join(raw_dir, split))
    rows = []
    for name, (rate, seconds, channels) in audio.items():
      _write_wav(os.path.join(raw_dir, split, name), rate, seconds, channels, rng)
      captions = _captions(split, name)
      # Empty cells between captions are dropped, the order of the others is kept.
      rows.append([name] + captions[:1] + [""] * (5 - len(captions)) + captions[1:])
    if split == "development":
      with open(os.path.join(raw_dir, split, "d4_broken.wav"), "wb") as f:
        f.write(b"RIFF not really a wav file")
      _write_wav(os.path.join(raw_dir, split, "d4_nocaption.wav"), 32000, 1.0, 1, rng)
      sf.write(os.path.join(raw_dir, split, "d9_short.wav"), np.zeros(100, np.float32), 32000)
      rows += [[name] + _captions(split, name) for name in ("d4_broken.wav", "d4_missing.wav", "d9_short.wav")]
      rows.append(["d4_nocaption.wav", "", " ", "", "", ""])
    rng.shuffle(rows)  # Row order must not matter.
    _write_csv(clotho.captions_csv_path(raw_dir, split), rows, CSV_ENCODINGS[split])


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("raw"))
  _make_raw_dir(path)
  return path


@pytest.fixture(scope="module")
def builder(raw_dir, tmp_path_factory):
  return clotho.prepare(raw_dir, str(tmp_path_factory.mktemp("prepared")))


def _records(builder, split) -> dict[str, dict]:
  """Stored records of `split` by file name, as numpy."""
  return {clip["file_name"].decode(): clip for clip in builder.as_dataset(split=split).as_numpy_iterator()}


def _all_pairs(split: str) -> collections.Counter:
  names = sorted(GOOD_AUDIO[split])
  return collections.Counter(
    (clip_id, caption) for clip_id, name in enumerate(names) for caption in _captions(split, name)
  )


def _epoch_pairs(batches) -> list[tuple[int, str]]:
  return [(int(i), c.decode()) for b in batches for i, c in zip(b["clip_id"], b["caption"])]


def _train_batches(builder, split, **kwargs):
  args = dict(batch_size=8, max_frames=MAX_FRAMES, seed=3, epoch=0) | kwargs
  return list(input_pipeline.train_dataset([(builder, split)], **args).as_numpy_iterator())


def test_log_mel_records_equal_the_front_end(raw_dir, builder):
  for split, audio in GOOD_AUDIO.items():
    records = _records(builder, split)
    assert sorted(records) == sorted(audio)
    for name, (rate, seconds, channels) in audio.items():
      path = os.path.join(raw_dir, split, name)
      expected = features.log_mel(features.load_audio(path))
      stored = records[name]["log_mel"]
      assert stored.dtype == np.float16
      # Frames of the 32 kHz waveform, whatever the file's rate: 44.1 kHz files were resampled.
      assert stored.shape == (features.num_frames(round(seconds * features.SAMPLE_RATE)), features.N_MELS)
      np.testing.assert_allclose(stored.astype(np.float32), expected, rtol=2.0**-11 * 1.01, atol=1e-6)
  stereo = sf.info(os.path.join(raw_dir, "development", "d2.wav"))
  assert (stereo.channels, stereo.samplerate) == (2, 44100)  # Covered above: stored as 151 frames of 32 kHz mono.


def test_longest_clip_is_read_from_the_prepared_data(builder):
  lengths = [
    record["log_mel"].shape[0]
    for split in ("development", "validation")
    for record in _records(builder, split).values()
  ]
  assert input_pipeline.longest_clip([(builder, "development"), (builder, "validation")]) == max(lengths)
  assert input_pipeline.longest_clip([(builder, "development")]) == max(
    record["log_mel"].shape[0] for record in _records(builder, "development").values()
  )


def test_ids_names_captions_and_frames_round_trip(builder):
  for split, audio in GOOD_AUDIO.items():
    names = sorted(audio)
    captions, caption_clip_ids, file_names = input_pipeline.eval_captions(builder, split)
    assert file_names == names
    assert captions == [c for name in names for c in _captions(split, name)]
    assert caption_clip_ids.dtype == np.int32
    np.testing.assert_array_equal(
      caption_clip_ids, np.repeat(np.arange(len(names)), [len(_captions(split, n)) for n in names])
    )
    frames = input_pipeline.eval_clip_frames(builder, split)  # From the preparation's clip table, as the rest.
    for name, record in _records(builder, split).items():
      assert record["clip_id"] == names.index(name)
      assert [c.decode() for c in record["captions"]] == _captions(split, name)
      assert frames[record["clip_id"]] == record["log_mel"].shape[0]
  assert "café naïve façade" in input_pipeline.eval_captions(builder, "validation")[0]  # latin-1 CSV
  assert "a “smart” quote — and a dash" in input_pipeline.eval_captions(builder, "evaluation")[0]  # cp1252 CSV


def test_bad_rows_are_skipped_and_reported(builder):
  assert builder.info.splits["development"].num_examples == len(GOOD_AUDIO["development"])
  with open(clip_builder.report_path(builder), newline="", encoding="utf-8") as f:
    skipped = {row["item"]: row["reason"] for row in csv.DictReader(f) if row["outcome"] == extraction.SKIPPED_CLIP}
  assert skipped == BAD_ROWS


@pytest.mark.parametrize(
  "header, missing", [(["name", "caption_1"], "file_name"), (["file_name", "description"], "caption_1")]
)
def test_missing_column_is_a_clear_error(tmp_path, header, missing):
  raw = tmp_path / "raw"
  (raw / "development").mkdir(parents=True)
  with open(clotho.captions_csv_path(str(raw), "development"), "w", newline="") as f:
    csv.writer(f).writerows([header, ["a.wav", "a caption"]])
  with pytest.raises(ValueError, match=rf"clotho_captions_development\.csv: required column '{missing}'"):
    clotho.prepare(str(raw), str(tmp_path / "prepared"))
  assert not clotho.Clotho(data_dir=str(tmp_path / "prepared")).data_path.exists()


@pytest.mark.parametrize("split, batch_size", [("development", 8), ("validation", 4)])
def test_one_epoch_visits_each_pair_once(builder, split, batch_size):
  expected = _all_pairs(split)
  assert sum(expected.values()) % batch_size == 0
  assert input_pipeline.train_pairs_per_epoch(builder, split) == sum(expected.values())
  batches = _train_batches(builder, split, batch_size=batch_size)
  assert (
    len(batches)
    == input_pipeline.steps_per_epoch([(builder, split)], batch_size)
    == sum(expected.values()) // batch_size
  )
  assert collections.Counter(_epoch_pairs(batches)) == expected


def test_crops_are_uniform_windows_with_padding_and_mask(builder):
  stored = {int(r["clip_id"]): r["log_mel"].astype(np.float32) for r in _records(builder, "development").values()}
  starts = collections.defaultdict(set)
  for epoch in range(3):
    for batch in _train_batches(builder, "development", epoch=epoch):
      assert batch["log_mel"].shape == (8, MAX_FRAMES, features.N_MELS) and batch["log_mel"].dtype == np.float32
      assert batch["frame_mask"].shape == (8, MAX_FRAMES) and batch["clip_id"].dtype == np.int32
      for log_mel, mask, clip_id in zip(batch["log_mel"], batch["frame_mask"], batch["clip_id"]):
        clip = stored[int(clip_id)]
        length = min(len(clip), MAX_FRAMES)
        np.testing.assert_array_equal(mask, np.arange(MAX_FRAMES) < length)
        np.testing.assert_array_equal(log_mel[length:], 0.0)
        matches = [s for s in range(len(clip) - length + 1) if np.array_equal(clip[s : s + length], log_mel[:length])]
        assert matches, f"row of clip {clip_id} is not a window of it"
        starts[int(clip_id)].add(matches[0])
  long_clips = [i for i, clip in stored.items() if len(clip) > MAX_FRAMES]
  short_clips = [i for i, clip in stored.items() if len(clip) <= MAX_FRAMES]
  assert long_clips and short_clips
  assert all(starts[i] == {0} for i in short_clips)
  # 15 draws per clip over 3 epochs; clips with >= 50 possible starts must not keep repeating a few.
  assert all(len(starts[i]) >= 5 for i in long_clips if len(stored[i]) - MAX_FRAMES >= 50), dict(starts)
  assert max(max(starts[i]) for i in long_clips) > 100


def test_same_seed_and_epoch_repeat_other_epochs_differ(builder):
  first = _train_batches(builder, "development", seed=5, epoch=2)
  again = _train_batches(builder, "development", seed=5, epoch=2)
  for a, b in zip(first, again, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  order = _epoch_pairs(first)
  assert _epoch_pairs(_train_batches(builder, "development", seed=5, epoch=3)) != order
  assert _epoch_pairs(_train_batches(builder, "development", seed=6, epoch=2)) != order


def test_skip_batches_resumes_the_epoch(builder):
  full = _train_batches(builder, "development", epoch=1)
  resumed = _train_batches(builder, "development", epoch=1, skip_batches=2)
  assert len(resumed) == len(full) - 2
  for a, b in zip(full[2:], resumed, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_two_shards_split_the_pairs(builder):
  per_process = [
    _epoch_pairs(_train_batches(builder, "development", batch_size=4, shard_index=p, num_shards=2)) for p in range(2)
  ]
  steps = input_pipeline.steps_per_epoch([(builder, "development")], 8)
  assert [len(pairs) for pairs in per_process] == [steps * 4] * 2
  assert not set(per_process[0]) & set(per_process[1])
  assert collections.Counter(per_process[0] + per_process[1]) == _all_pairs("development")


def test_shards_stay_in_step_when_they_differ_in_pairs(builder):
  # validation: 4 clips with 5, 4, 2 and 1 captions; each shard gets 2 clips, so the pair counts differ.
  steps = input_pipeline.steps_per_epoch([(builder, "validation")], 4)
  per_process = [_train_batches(builder, "validation", batch_size=2, shard_index=p, num_shards=2) for p in range(2)]
  assert [len(batches) for batches in per_process] == [steps, steps]
  clip_sets = [{clip_id for clip_id, _ in _epoch_pairs(batches)} for batches in per_process]
  assert not clip_sets[0] & clip_sets[1]


def counting_reads(builder, monkeypatch) -> collections.Counter:
  """Counts the records `builder.as_dataset` yields, by clip id, from now on (the records every pipeline reads)."""
  import tensorflow as tf

  reads, as_dataset = collections.Counter(), builder.as_dataset

  def count(clip_id):
    reads[int(clip_id)] += 1
    return clip_id

  def counted(*args, **kwargs):
    return as_dataset(*args, **kwargs).map(
      lambda clip: {**clip, "clip_id": tf.ensure_shape(tf.numpy_function(count, [clip["clip_id"]], tf.int32), ())}
    )

  monkeypatch.setattr(builder, "as_dataset", counted)
  return reads


@pytest.mark.parametrize(
  "split, batch_size, process_count, max_segment",
  [
    ("evaluation", 2, 1, 3001),
    ("evaluation", 2, 2, 3001),
    ("development", 3, 3, 3001),
    ("development", 2, 2, 3001),
    ("development", 2, 2, 80),  # Every clip but d3 (51 frames) is cut.
    ("development", 3, 1, 100),
  ],
)
def test_eval_batches_hold_every_clip_once_and_whole(
  builder, monkeypatch, split, batch_size, process_count, max_segment
):
  """Every process reads each record once, yields batches of the same shapes in the same order, never longer than
  the segments' padded length, and together they hold every clip's segments (`clip_segments`) exactly once."""
  stored = {int(r["clip_id"]): r["log_mel"].astype(np.float32) for r in _records(builder, split).values()}
  np.testing.assert_array_equal(
    input_pipeline.eval_clip_frames(builder, split), [len(stored[i]) for i in range(len(stored))]
  )
  per_process = []
  for p in range(process_count):
    reads = counting_reads(builder, monkeypatch)
    per_process.append(
      list(
        input_pipeline.eval_clip_batches(
          builder,
          split,
          batch_size=batch_size,
          max_segment_frames=max_segment,
          process_index=p,
          process_count=process_count,
        )
      )
    )
    assert reads == {clip_id: 1 for clip_id in stored}  # One pass: every record once.
    monkeypatch.undo()
  shapes = [[batch["log_mel"].shape for batch in batches] for batches in per_process]
  assert all(s == shapes[0] for s in shapes)
  segments = collections.Counter()
  for batches in per_process:
    for batch in batches:
      frames = batch["log_mel"].shape[1]
      assert batch["log_mel"].shape == (batch_size, frames, features.N_MELS)
      assert frames <= input_pipeline.padded_frames(max_segment)
      assert batch["valid"].dtype == bool and batch["clip_id"].dtype == np.int32
      assert batch["weight"].dtype == np.float32
      for log_mel, mask, clip_id, valid, weight in zip(
        batch["log_mel"], batch["frame_mask"], batch["clip_id"], batch["valid"], batch["weight"]
      ):
        if not valid:
          assert clip_id == -1 and not mask.any() and not log_mel.any() and weight == 0
          continue
        clip = stored[int(clip_id)]
        length = int(mask.sum())
        np.testing.assert_array_equal(mask, np.arange(frames) < length)
        np.testing.assert_array_equal(log_mel[length:], 0.0)
        start = _find_rows(clip, log_mel[:length])
        segments[(int(clip_id), start, length, float(weight))] += 1
        whole = len(clip) <= max_segment
        assert frames == input_pipeline.padded_frames(len(clip) if whole else max_segment)
  expected = collections.Counter(
    (clip_id, start, frames, float(weight))
    for clip_id, clip in stored.items()
    for start, frames, weight in input_pipeline.clip_segments(len(clip), max_segment)
  )
  assert segments == expected
  assert sum(count > 1 for count in input_pipeline.segment_counts(list(map(len, stored.values())), max_segment)) == (
    7 if max_segment == 80 else 6 if max_segment == 100 else 0  # Cap 100: d5 (101 frames) keeps one segment.
  )


def _find_rows(clip: np.ndarray, rows: np.ndarray) -> int:
  """The row of `clip` where `rows` start (the segment's first frame)."""
  for start in range(len(clip) - len(rows) + 1):
    if np.array_equal(clip[start : start + len(rows)], rows):
      return start
  raise AssertionError("the segment is not a slice of its clip")


def test_clip_segments_cut_long_clips_into_weighted_segments():
  # A 10 s block counts when it holds at least 16 frames: a 75 s clip in 30 s (3001-frame) segments weighs 3, 3, 2.
  assert input_pipeline.clip_segments(7500, 3001) == [(0, 3001, 3), (3001, 3001, 3), (6002, 1498, 2)]
  assert input_pipeline.clip_segments(3001, 3001) == [(0, 3001, 1)]  # Whole.
  assert input_pipeline.clip_segments(6010, 3000) == [(0, 3000, 3), (3000, 3000, 3)]  # A 10-frame tail is left out.
  assert input_pipeline.clip_segments(6016, 3000) == [(0, 3000, 3), (3000, 3000, 3), (6000, 16, 1)]
  assert input_pipeline.clip_segments(2520, 2000) == [(0, 2000, 2), (2000, 520, 1)]
  lengths = np.arange(1, 9000, 7)
  for cap in (64, 1000, 3001):
    np.testing.assert_array_equal(
      input_pipeline.segment_counts(lengths, cap), [len(input_pipeline.clip_segments(int(n), cap)) for n in lengths]
    )
  assert input_pipeline.max_segment_frames(30.0, audio_forms.LOG_MEL) == 3001
  assert input_pipeline.max_segment_frames(30.0, audio_forms.WAVEFORM) == 3000
  with pytest.raises(ValueError, match="config.eval.max_segment_s=0.5"):
    input_pipeline.max_segment_frames(0.5, audio_forms.LOG_MEL)


def test_padded_frames_are_few_lengths_with_little_padding():
  lengths = np.arange(1, 40_000)
  padded = np.array([input_pipeline.padded_frames(int(n)) for n in lengths])
  assert (padded >= lengths).all()
  assert (padded <= np.maximum(1.25 * lengths, input_pipeline.MIN_PADDED_FRAMES)).all()
  assert (np.diff(padded) >= 0).all()
  # Four lengths per octave: 30 s Clotho clips (1500-3001 frames) share 5 lengths.
  assert len(set(padded[1499:3001])) == 5
  assert input_pipeline.padded_frames(1001) == 1024 and input_pipeline.padded_frames(3001) == 3072


@pytest.fixture(scope="module")
def encode_captions():
  """The caption path of a MiniLM config: reference cleaning, then MiniLM's tokenizer, 24 tokens."""
  from atr_jax.models.bert import minilm_dir
  from atr_jax.tokenization import load_tokenizer

  return captions.CaptionEncoder(load_tokenizer(minilm_dir(), 24), "reference")


def test_training_and_evaluation_tokenize_the_same_text(builder, encode_captions):
  """Token ids of real training batches (model-ready from the input pipeline, whose captions tf.data hands over as
  bytes) equal those of the evaluation and retrieval path (`caption_batches`) for the same (clip, caption) pairs,
  quotes, punctuation and non-ASCII captions included; and they are transformers' AutoTokenizer ids of the
  cleaned text."""
  import transformers

  from atr_jax.models.bert import minilm_dir

  eval_captions, clip_ids, _ = input_pipeline.eval_captions(builder, "development")
  assert {SPECIAL_CAPTIONS["d1.wav"], SPECIAL_CAPTIONS["d5.wav"]} <= set(eval_captions)
  batches = list(
    input_pipeline.caption_batches(
      eval_captions, encode_captions, global_batch_size=16, process_index=0, process_count=1
    )
  )
  ids = np.concatenate([local["input_ids"][:count] for local, count in batches])
  expected = collections.Counter(zip(clip_ids.tolist(), map(tuple, ids.tolist())))
  train_batches = list(
    input_pipeline.process_train_batches(
      [(builder, "development")],
      global_batch_size=8,
      num_shards=1,
      process_index=0,
      process_count=1,
      encode_captions=encode_captions,
      max_frames=MAX_FRAMES,
      seed=3,
      epoch=0,
    )
  )
  assert "caption" not in train_batches[0] and train_batches[0]["input_ids"].dtype == np.int32
  trained = collections.Counter(
    (int(clip_id), tuple(row)) for batch in train_batches for clip_id, row in zip(batch["clip_id"], batch["input_ids"])
  )
  assert sum(trained.values()) == sum(expected.values()) == 40
  assert trained == expected

  reference = transformers.AutoTokenizer.from_pretrained(minilm_dir())
  texts = encode_captions.texts(eval_captions + ["a very long caption " * 10])
  tokens = encode_captions(eval_captions + ["a very long caption " * 10])
  expected_tokens = reference(texts, padding="max_length", truncation=True, max_length=24, return_tensors="np")
  for key in ("input_ids", "attention_mask"):
    np.testing.assert_array_equal(tokens[key], expected_tokens[key])
  special = encode_captions([SPECIAL_CAPTIONS["d5.wav"].encode("utf-8")])["input_ids"][0]
  # The cleaned text (lower case, ':' and '!' removed), accents stripped by the uncased tokenizer.
  assert reference.decode(special, skip_special_tokens=True) == "a cafe ' s naive facade “ smart ” quotes"


def test_dcase2025_cleaning_through_the_real_pipeline(builder):
  """caption_cleaning="dcase2025" (SPEC 11b): real training batches (captions as tf.data hands them over, bytes) and
  the evaluation captions (`caption_batches`) are tokenised from the DCASE 2025 baseline's cleaning, written here
  independently: lower-case, then every printable ASCII character that is neither a letter nor a digit deleted, no
  space put in (quotes, apostrophes, colons; accents and non-ASCII marks kept)."""
  from atr_jax.models.bert import minilm_dir
  from atr_jax.tokenization import load_tokenizer

  ascii_marks = {chr(code) for code in range(33, 127) if not chr(code).isalnum()}
  clean = lambda caption: "".join(c for c in caption.lower() if c not in ascii_marks)  # noqa: E731
  tokenizer = load_tokenizer(minilm_dir(), 24)
  encode = captions.CaptionEncoder(tokenizer, "dcase2025")
  train_batches = input_pipeline.process_train_batches(
    [(builder, "development")],
    global_batch_size=8,
    num_shards=1,
    process_index=0,
    process_count=1,
    encode_captions=encode,
    max_frames=MAX_FRAMES,
    seed=3,
    epoch=0,
  )
  trained = collections.Counter(
    (int(clip_id), tuple(row)) for batch in train_batches for clip_id, row in zip(batch["clip_id"], batch["input_ids"])
  )
  pairs = _all_pairs("development")
  ids = tokenizer([clean(caption) for _, caption in pairs])["input_ids"]
  assert trained == collections.Counter(
    {(clip_id, tuple(row)): pairs[clip_id, caption] for (clip_id, caption), row in zip(pairs, ids)}
  )
  eval_captions, _, _ = input_pipeline.eval_captions(builder, "evaluation")
  batches = input_pipeline.caption_batches(eval_captions, encode, global_batch_size=8, process_index=0, process_count=1)
  evaluated = np.concatenate([local["input_ids"][:count] for local, count in batches])
  np.testing.assert_array_equal(evaluated, tokenizer([clean(caption) for caption in eval_captions])["input_ids"])
  assert encode.texts([SPECIAL_CAPTIONS["d5.wav"].encode("utf-8"), SPECIAL_CAPTIONS["d1.wav"]]) == [
    "a cafés naïve façade “smart” quotes",
    "a quoted comma caption",
  ]


def test_caption_batches_give_each_process_its_slice(encode_captions):
  texts = [f"caption number {i}" for i in range(11)]
  whole = list(
    input_pipeline.caption_batches(texts, encode_captions, global_batch_size=8, process_index=0, process_count=1)
  )
  halves = [
    list(input_pipeline.caption_batches(texts, encode_captions, global_batch_size=8, process_index=p, process_count=2))
    for p in range(2)
  ]
  assert [count for _, count in whole] == [8, 3]
  for (batch, _), (first, _), (second, _) in zip(whole, *halves, strict=True):
    np.testing.assert_array_equal(batch["input_ids"], np.concatenate([first["input_ids"], second["input_ids"]]))
  last = whole[1][0]["input_ids"]
  np.testing.assert_array_equal(last[:3], encode_captions(texts[8:])["input_ids"])
  np.testing.assert_array_equal(last[3:], encode_captions([""] * 5)["input_ids"])  # Padding rows, dropped by callers.


def test_second_prepare_is_instant_and_reads_no_audio(raw_dir, builder, monkeypatch):
  def fail(path):
    raise AssertionError(f"prepare re-read {path}")

  monkeypatch.setattr(features, "read_audio", fail)
  start = time.perf_counter()
  again = clotho.prepare(raw_dir, builder.data_dir_root)
  assert time.perf_counter() - start < 1.0
  assert again.info.splits["development"].num_examples == len(GOOD_AUDIO["development"])


_KILLED_PREPARE = textwrap.dedent("""
    import itertools, pathlib, sys, time
    from data_pipelines import clotho, extraction
    read, records = extraction.load_clip, itertools.count()
    def stall_after_development(cache_path):  # The 8 development records are written by then.
      if next(records) == 8:
        pathlib.Path(sys.argv[3]).write_text("stalled")
        time.sleep(600)
      return read(cache_path)
    extraction.load_clip = stall_after_development
    clotho.prepare(sys.argv[1], sys.argv[2])
""")


def test_killed_preparation_is_redone(raw_dir, tmp_path):
  data_dir, flag = tmp_path / "prepared", tmp_path / "stalled"
  child = subprocess.Popen(
    [sys.executable, "-c", _KILLED_PREPARE, raw_dir, str(data_dir), str(flag)],
    cwd=REPO_ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:
    deadline = time.monotonic() + 120
    while not flag.exists():
      assert child.poll() is None, "the preparing process ended early"
      assert time.monotonic() < deadline, "the preparing process never reached the validation split"
      time.sleep(0.2)
  finally:
    child.send_signal(signal.SIGKILL)
    child.wait()
  leftovers = list((data_dir / "clotho").glob("incomplete.*"))
  assert leftovers and any(leftovers[0].iterdir())  # The killed build left a half-written folder ...
  half_built = clotho.Clotho(data_dir=str(data_dir))
  assert not half_built.data_path.exists() and not half_built.is_prepared()  # ... that is not taken as the dataset.
  rebuilt = clotho.prepare(raw_dir, str(data_dir))
  assert rebuilt.is_prepared()
  assert {split: rebuilt.info.splits[split].num_examples for split in GOOD_AUDIO} == {
    split: len(audio) for split, audio in GOOD_AUDIO.items()
  }
  assert _records(rebuilt, "development").keys() == GOOD_AUDIO["development"].keys()


def test_prepare_cli_prints_counts(raw_dir, builder):
  result = subprocess.run(
    [sys.executable, "-m", "data_pipelines.prepare", f"--raw_dir={raw_dir}", f"--out_dir={builder.data_dir_root}"],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    check=True,
  )
  assert "development: 8 clips, 40 captions" in result.stdout
  assert "validation: 4 clips, 12 captions" in result.stdout
  assert "evaluation: 3 clips, 15 captions" in result.stdout


def test_global_batches_do_not_depend_on_the_process_count(builder, encode_captions):
  sources = [(builder, "development")]
  args = dict(
    global_batch_size=8,
    num_shards=2,
    encode_captions=encode_captions,
    max_frames=MAX_FRAMES,
    seed=4,
    epoch=1,
    skip_batches=1,
  )
  one_process = list(input_pipeline.process_train_batches(sources, process_index=0, process_count=1, **args))
  two_processes = [
    list(input_pipeline.process_train_batches(sources, process_index=p, process_count=2, **args)) for p in range(2)
  ]
  assert len(one_process) == input_pipeline.steps_per_epoch(sources, 8) - 1
  for whole, first, second in zip(one_process, *two_processes, strict=True):
    for key in whole:
      np.testing.assert_array_equal(whole[key], np.concatenate([first[key], second[key]]))
  with pytest.raises(ValueError, match="num_input_shards=3 must be a positive multiple of the process count"):
    input_pipeline.process_train_batches(sources, process_index=0, process_count=2, **(args | {"num_shards": 3}))


def test_sources_are_combined_with_unique_clip_ids(builder):
  sources = [(builder, "development"), (builder, "validation")]
  dev_clips = len(GOOD_AUDIO["development"])
  expected = _all_pairs("development") + collections.Counter(
    {(clip_id + dev_clips, caption): n for (clip_id, caption), n in _all_pairs("validation").items()}
  )
  total = sum(expected.values())
  batch_size = 4
  assert input_pipeline.steps_per_epoch(sources, batch_size) == total // batch_size
  batches = list(
    input_pipeline.train_dataset(
      sources, batch_size=batch_size, max_frames=MAX_FRAMES, seed=3, epoch=0
    ).as_numpy_iterator()
  )
  pairs = collections.Counter(_epoch_pairs(batches))
  assert sum(pairs.values()) == total // batch_size * batch_size
  assert not pairs - expected  # Every pair is a real one, with its clip id offset past the first source's clips.
  assert {clip_id for clip_id, _ in pairs} & set(range(dev_clips, dev_clips + len(GOOD_AUDIO["validation"])))


def test_extra_sources_are_cropped_to_their_own_length(builder):
  """data.extra_train_max_frames: the extra sources' clips are cropped to it (padded to the batch's length), the main
  source's to train_max_frames, and "the longest clip" (train_max_frames = 0) counts the extra sources up to it."""
  sources = [(builder, "validation"), (builder, "development")]  # Longest clips: 221 and 301 frames.
  assert input_pipeline.train_max_frames(sources, 0, 150) == 221
  assert input_pipeline.train_max_frames(sources, 0, 0) == 301
  assert input_pipeline.train_max_frames(sources, 0, 1001) == 301
  assert input_pipeline.train_max_frames(sources[1:], 0, 150) == 301  # No extra source.
  assert input_pipeline.train_max_frames(sources, 128, 150) == 128
  stored = {int(r["clip_id"]): r["log_mel"].astype(np.float32) for r in _records(builder, "validation").values()}
  offset = len(stored)
  stored |= {
    int(r["clip_id"]) + offset: r["log_mel"].astype(np.float32) for r in _records(builder, "development").values()
  }
  crops = collections.defaultdict(set)
  for epoch in range(2):
    batches = input_pipeline.train_dataset(
      sources, batch_size=4, max_frames=221, extra_max_frames=150, seed=3, epoch=epoch
    ).as_numpy_iterator()
    for batch in batches:
      assert batch["log_mel"].shape == (4, 221, features.N_MELS)
      for log_mel, mask, clip_id in zip(batch["log_mel"], batch["frame_mask"], batch["clip_id"]):
        clip = stored[int(clip_id)]
        length = min(len(clip), 221 if clip_id < offset else 150)
        np.testing.assert_array_equal(mask, np.arange(221) < length)
        np.testing.assert_array_equal(log_mel[length:], 0.0)
        crops[int(clip_id)].add(_find_rows(clip, log_mel[:length]))
  assert {i for i in crops if i >= offset and len(stored[i]) > 150}  # Extra clips were cut...
  assert max(max(crops[i]) for i in crops if i >= offset) > 0  # ...at random starts.
