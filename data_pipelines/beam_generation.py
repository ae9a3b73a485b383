"""The Apache Beam runner of a preparation (`prepare --runner beam`): it runs the per-clip work, decoding and the stored
array of the audio form (log-mel or int16 waveform, `audio_forms`) into the feature cache, as a Beam pipeline instead of
`extraction.Extractor`'s worker pool, and owns the parsing of `--beam_pipeline_options`.

Same code, same records. Each clip goes through `extraction.extract`, in a `python -m data_pipelines.extraction` child
of the Beam worker (`extraction.WorkerProcess`, the worker pool's own child), so a file whose decoding crashes is
skipped as unreadable exactly as in the worker pool instead of failing the bundle. The outcomes come back to the
launching process, which then does what the multiprocessing path does with them: the report, `clips.json`,
`sources.json`, and the records (of either audio form), written by TFDS's `Writer` from the cache (`clip_builder`). The
records are thus the multiprocessing path's, in the same shard files, byte-identical when both run in one process (TFDS
serializes with `SerializeToString()`, whose feature order under protobuf's upb backend varies from process to process,
for either runner). (TFDS's `BeamWriter` is not used on purpose: it assigns examples to shards by key-hash range, where
`Writer` splits them evenly, so the shard files of a split of more than one shard would differ.) The launcher's share is
one sequential pass over the cache; decoding, nearly all of the CPU time, is on the Beam workers.

Resumability: every cache entry is written under a temporary name and renamed by `extraction.extract`, so a Beam
bundle retried after a worker failure, and a pipeline killed and started again (any runner), decode only the clips
not cached yet; the records are written only once every clip has an outcome, into TFDS's `incomplete.*` folder, as on
the multiprocessing path. What a killed job had in flight on its workers is lost (at most one clip per worker).

Storage. RAW, OUT and the feature cache (beside OUT, or the shared cache of the default folders) are read and written
with Python's `os` and `open`: they must be local paths, or a shared POSIX filesystem mounted at the same path on the
launcher and on every worker (NFS, Filestore, a GCS bucket mounted with gcsfuse); `gs://` URLs are not supported. The
pipeline's own inputs and outputs (a list of audio paths, one JSON line of outcome per clip) are written in a `beam-*`
folder of the feature cache and deleted afterwards.

Workers of a cluster runner (Dataflow, Flink, Spark; only the DirectRunner is tested here) need this package and
its dependencies: `pip install 'atr-jax[beam]'` (Dataflow: `apache-beam[gcp]`) with the launcher's Python and
apache-beam versions, baked into the worker image (`sdk_container_image=...`) or installed at start-up from
`setup_file=./pyproject.toml` (Beam builds an sdist with `python -m build`, which must be installed on the launcher).
The workers import `data_pipelines.beam_generation` to unpickle the DoFn and start `python -m
data_pipelines.extraction` children; TensorFlow runs on the launcher only. With no `runner=` option the pipeline
runs on the DirectRunner in multi_threading mode, with `--workers` threads (default: one per core), each feeding its
own extraction child process.
"""

import dataclasses
import glob
import json
import os
import shutil
import uuid

import apache_beam as beam
from apache_beam.options import pipeline_options
from apache_beam.runners import runner as beam_runner

from data_pipelines import audio_forms, extraction


def parse_options(spec: str, workers: int | None = None) -> pipeline_options.PipelineOptions:
  """The pipeline options of `spec`, comma-separated `name=value` pairs (a bare `name` is a boolean flag) such as
  "runner=DirectRunner,direct_num_workers=2". Without a runner, the DirectRunner in multi_threading mode with
  `workers` workers (default: one per core). A ValueError naming the option when one is unknown, malformed, has a
  bad value or names an unknown runner."""
  flags, names = [], set()
  for item in (item.strip() for item in spec.split(",")):
    if not item:
      continue
    name, has_value, value = item.partition("=")
    name = name.strip().removeprefix("--")
    if not name or (has_value and not value.strip()):
      raise ValueError(f"--beam_pipeline_options: {item!r} is not 'name=value'")
    flags.append(f"--{name}={value.strip()}" if has_value else f"--{name}")
    names.add(name)
  known = pipeline_options.PipelineOptions([]).get_all_options(drop_default=False)
  unknown = sorted(names - known.keys())
  if unknown:
    raise ValueError(f"--beam_pipeline_options: unknown Beam pipeline option {unknown[0]!r}")
  if "runner" not in names:
    flags.append("--runner=DirectRunner")
    if not names & {"direct_running_mode", "direct_num_workers"}:
      flags += [
        "--direct_running_mode=multi_threading",
        f"--direct_num_workers={workers or extraction.default_workers()}",
      ]
  options = pipeline_options.PipelineOptions(flags)
  try:
    parsed = options.get_all_options()
  except SystemExit:  # argparse's answer to a bad value, already printed to stderr.
    bad = [flag for flag in flags if _bad_value(flag)]
    raise ValueError(f"--beam_pipeline_options: bad value in {', '.join(bad) or spec!r}") from None
  try:
    beam_runner.create_runner(parsed["runner"])
  except (ValueError, RuntimeError) as e:
    raise ValueError(f"--beam_pipeline_options: runner={parsed['runner']!r} is not a Beam runner ({e})") from None
  return options


def _bad_value(flag: str) -> bool:
  try:
    pipeline_options.PipelineOptions([flag]).get_all_options()
  except SystemExit:
    return True
  return False


class _Extract(beam.DoFn):
  """DoFn: a clip's [audio path, cache name] to (path, outcome as a dict), by `extraction.extract` in audio form
  `form_name` in this worker's own child."""

  def __init__(self, cache_dir: str, form_name: str):
    self._cache_dir = cache_dir
    self._form_name = form_name
    self._process = None

  def setup(self):
    self._process = extraction.WorkerProcess(self._cache_dir, self._form_name)

  def process(self, line: str):
    path, name = json.loads(line)
    yield json.dumps([path, dataclasses.asdict(self._process.extract(path, name))])

  def teardown(self):
    if self._process is not None:
      self._process.close(kill=False)
      self._process = None


def extract(
  paths: list[str],
  cache_dir: str,
  options: pipeline_options.PipelineOptions,
  form_name: str = "log_mel",
  names: dict[str, str] | None = None,
) -> dict[str, extraction.AudioOutcome]:
  """The outcome of every path of `paths` (audio files) by path, in audio form `form_name`, computed by a Beam
  pipeline with `options` (`parse_options`) into the feature cache `cache_dir`; `names`: the cache name of each
  path (`extraction.extract`; default: its absolute path)."""
  audio_forms.audio_form(form_name, key="form_name")  # A bad form name fails before any work.
  extraction.clear_partial_writes(cache_dir)
  if not paths:
    return {}
  work_dir = os.path.join(cache_dir, f"beam-{uuid.uuid4().hex}")
  os.makedirs(work_dir)
  try:
    inputs = os.path.join(work_dir, "paths.jsonl")
    with open(inputs, "w", encoding="utf-8") as f:
      f.writelines(json.dumps([path, (names or {}).get(path)]) + "\n" for path in sorted(set(paths)))
    with beam.Pipeline(options=options) as pipeline:
      _ = (
        pipeline
        | "ReadPaths" >> beam.io.ReadFromText(inputs)
        | "Distribute" >> beam.Reshuffle()
        | "ExtractFeatures" >> beam.ParDo(_Extract(cache_dir, form_name))
        | "WriteOutcomes" >> beam.io.WriteToText(os.path.join(work_dir, "outcomes"), file_name_suffix=".jsonl")
      )
    outcomes = {}
    for name in glob.glob(os.path.join(work_dir, "outcomes*.jsonl")):
      with open(name, encoding="utf-8") as f:
        for line in f:
          path, fields = json.loads(line)
          fields["notes"] = tuple(tuple(note) for note in fields["notes"])
          outcomes[path] = extraction.AudioOutcome(**fields)
  finally:
    shutil.rmtree(work_dir, ignore_errors=True)
  missing = set(paths) - outcomes.keys()
  if missing:
    raise RuntimeError(f"the Beam pipeline returned no outcome for {len(missing)} clips, e.g. {sorted(missing)[0]}")
  return outcomes
