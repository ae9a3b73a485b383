"""Preparation on Apache Beam (`prepare --runner beam`, data_pipelines.beam_generation): on the Clotho fixture of
test_prepare (good clips, converted ones, a silent one and a broken input of every kind), the DirectRunner writes
the very records, report, clips.json, sources.json and counts of the multiprocessing runner; a decoder crash on the
Beam path skips that clip only, as in the worker pool; a restarted extraction reuses what the cache holds; a bad
--beam_pipeline_options value is a clear error naming it."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("apache_beam")

from data_pipelines import beam_generation, clip_builder, clotho  # noqa: E402
from test_prepare import (  # noqa: E402
  _CRASH_ON_A_FILE,
  REPO_ROOT,
  ClothoFixture,
  _env_with_sitecustomize,
  _write_audio,
)


def _files(builder: clip_builder.CaptionedClips) -> dict[str, bytes]:
  return {path.name: path.read_bytes() for path in sorted(builder.data_path.iterdir()) if path.is_file()}


@pytest.mark.slow
def test_direct_runner_writes_what_the_multiprocessing_runner_writes(tmp_path):
  raw = ClothoFixture(str(tmp_path / "raw"))
  pooled = clotho.prepare(raw.root, str(tmp_path / "pooled"), workers=2)
  beamed = clotho.prepare(
    raw.root, str(tmp_path / "beamed"), workers=2, beam_options="direct_running_mode=multi_processing"
  )
  expected, got = _files(pooled), _files(beamed)
  # Records of every shard, report, clips.json, sources.json, dataset_info.json (split sizes, counts) alike.
  assert sorted(got) == sorted(expected)
  assert {name for name in got if ".tfrecord-" in name} == {
    f"clotho-{split}.tfrecord-00000-of-00001" for split in ("development", "validation", "evaluation", "retrieval")
  }
  for name in expected:
    assert got[name] == expected[name], name
  assert beamed.info.metadata["preparation"] == pooled.info.metadata["preparation"]
  assert {split: beamed.info.splits[split].num_examples for split in beamed.info.splits} == {
    split: len(clips) for split, clips in raw.expected.items()
  }
  # The broken inputs are all in the report, as on the multiprocessing path (test_prepare checks that one).
  report = (beamed.data_path / clip_builder.REPORT_FILE).read_text(encoding="utf-8")
  for reason in ("missing_audio", "unreadable_audio", "truncated_audio", "empty_file", "too_short", "no_caption"):
    assert f",skipped clip,{reason}," in report, reason
  # The pipeline's scratch folder is gone; the cache holds one entry per written clip.
  cache = beamed.feature_cache_dir
  assert all(name.endswith(".npz") for name in os.listdir(cache))
  assert len(os.listdir(cache)) == sum(len(clips) for clips in raw.expected.values())


_RUN_BEAM = """
import json, os, sys
from data_pipelines import beam_generation
paths = sys.argv[2:]
outcomes = beam_generation.extract(paths, sys.argv[1], beam_generation.parse_options("", workers=2))
print(json.dumps({os.path.basename(p): [o.reason, o.detail, o.cache_path is not None] for p, o in outcomes.items()}))
"""


def test_a_decoder_crash_on_the_beam_path_skips_only_that_file(tmp_path):
  names = ["a.wav", "crash.wav", "b.wav"]
  for index, name in enumerate(names):
    _write_audio(str(tmp_path / name), "good", index)
  (tmp_path / "site").mkdir()
  result = subprocess.run(
    [sys.executable, "-c", _RUN_BEAM, str(tmp_path / "cache")] + [str(tmp_path / n) for n in names],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    env=_env_with_sitecustomize(tmp_path / "site", _CRASH_ON_A_FILE),
    timeout=180,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  outcomes = json.loads(result.stdout.strip().splitlines()[-1])
  assert {name: (reason, good) for name, (reason, _, good) in outcomes.items()} == {
    "a.wav": ("", True),
    "b.wav": ("", True),
    "crash.wav": ("unreadable_audio", False),
  }
  assert "crash.wav killed its worker process (exit status 3" in outcomes["crash.wav"][1]


def test_default_options_are_the_direct_runner_with_the_workers():
  options = beam_generation.parse_options("", workers=3).get_all_options()
  assert (options["runner"], options["direct_running_mode"], options["direct_num_workers"]) == (
    "DirectRunner",
    "multi_threading",
    3,
  )
  options = beam_generation.parse_options(" runner=DirectRunner , direct_num_workers=2,").get_all_options()
  assert (options["runner"], options["direct_num_workers"]) == ("DirectRunner", 2)


@pytest.mark.parametrize(
  "spec, named",
  [
    ("direct_num_workerz=2", "'direct_num_workerz'"),
    ("direct_num_workers=two", "--direct_num_workers=two"),
    ("direct_running_mode=sideways", "--direct_running_mode=sideways"),
    ("runner=NoSuchRunner", "runner='NoSuchRunner'"),
    ("direct_num_workers=", "'direct_num_workers='"),
  ],
)
def test_bad_pipeline_option_is_a_clear_error_naming_it(spec, named):
  with pytest.raises(ValueError, match="--beam_pipeline_options") as error:
    beam_generation.parse_options(spec)
  assert named in str(error.value)


def test_prepare_cli_rejects_a_bad_pipeline_option_before_any_work(tmp_path):
  out_dir = tmp_path / "out"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "data_pipelines.prepare",
      f"--raw_dir={tmp_path}",
      f"--out_dir={out_dir}",
      "--runner=beam",
      "--beam_pipeline_options=runner=DirectRunner,direct_num_workerz=2",
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0
  assert "unknown Beam pipeline option 'direct_num_workerz'" in result.stderr
  assert not out_dir.exists()


def test_a_restarted_beam_extraction_reuses_the_cached_clips(tmp_path):
  paths = []
  for index, name in enumerate(["a.wav", "b.wav", "garbage.wav"]):
    _write_audio(str(tmp_path / name), "good" if name != "garbage.wav" else name, index)
    paths.append(str(tmp_path / name))
  cache, options = str(tmp_path / "cache"), beam_generation.parse_options("", workers=2)
  first = beam_generation.extract(paths, cache, options)
  entries = {name: os.stat(os.path.join(cache, name)).st_mtime_ns for name in os.listdir(cache)}
  (tmp_path / "cache" / "x.npz.partial-123").write_bytes(b"a killed run's partial write")
  again = beam_generation.extract(paths, cache, options)
  assert again == first
  assert {os.path.basename(p): (o.reason, o.cache_path is not None) for p, o in again.items()} == {
    "a.wav": ("", True),
    "b.wav": ("", True),
    "garbage.wav": ("unreadable_audio", False),
  }
  # The good clips came from the cache (not written again); the partial write and the pipeline's folder are gone.
  assert {name: os.stat(os.path.join(cache, name)).st_mtime_ns for name in os.listdir(cache)} == entries
  assert len(entries) == 2
