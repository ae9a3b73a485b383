"""Command line of audio moment retrieval (SPEC 12, issue 28): train, evaluate, predict, submission.

  python -m atr_jax.moments train --config configs/demo_moments.py --workdir runs/moments [--config.moments.K=V ...]
  python -m atr_jax.moments evaluate --workdir runs/moments --annotations OUT/test.jsonl --audio_dir OUT/test
  python -m atr_jax.moments predict --workdir runs/moments --audio LONG.wav --query "a dog barks" [--top_k 5]
  python -m atr_jax.moments submission --workdir runs/moments --annotations test.jsonl --audio_dir DIR --output S.jsonl

train: trains the encoder first when `moments.encoder_workdir` holds none and `moments.train_encoder` says so
(`atr_jax.train.train_and_evaluate` with the same config), synthesises the moment set into `moments.data.dir` when
absent and `moments.data.synthesize` says so (from `moments.data.synthetic_clips_dir`, itself generated first when
absent and `synthetic_clip_seconds` > 0), computes (or reads from the cache) the frame and token features of the
train and validation splits (`atr_jax.moments.features`), writes the moment workdir's `moment_config.json` (the
`moments` config and the encoder's absolute path), trains (`atr_jax.moments.train`) and prints the best validation
metrics beside the sliding-window baseline's (`atr_jax.moments.sliding_window`).
evaluate: the best checkpoint's metrics on one split beside the baseline's, printed and written to
`<workdir>/moment_results.json` (the model's five metrics at the top level, the baseline's under "sliding_window",
the annotations and audio folder evaluated).
predict: the moments of one recording for one sentence, best first, with their foreground scores; recordings longer
than `moments.train.max_frames` frames are segmented and merged (`atr_jax.moments.train.predict`).
submission: the challenge's JSONL, one line a query (`qid`, `query`, `vid`, `pred_relevant_windows`: the ranked
windows without scores, clamped to [0, 300] s and rounded to whole seconds as the baseline does; halves go up
here, the baseline's own tie rule is unconfirmed).
A user error (a missing file or folder, a workdir that is not a moment workdir, a bad config key) prints one line and
exits with status 1.
"""

from atr_jax import xla_flags

xla_flags.set_defaults()  # Before jax is imported.

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from atr_jax import console  # noqa: E402

console.quiet_tensorflow(sys.argv)  # Before TensorFlow loads (the features load it).

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from atr_jax import checkpointing, model_identity, sharding  # noqa: E402
from atr_jax.atomic_files import write_text_atomically  # noqa: E402
from atr_jax.moments import features, metrics, sliding_window  # noqa: E402
from atr_jax.moments import train as moment_train  # noqa: E402
from data_pipelines import clip_builder  # noqa: E402

CONFIG_FILE, RESULTS_FILE = "moment_config.json", "moment_results.json"
METRIC_KEYS = ("R1@0.5", "R1@0.7", "mAP", "mAP@0.5", "mAP@0.75")
SUBMISSION_MAX_S = 300.0  # The challenge's recordings are at most 300 s.


class UsageError(Exception):
  """A user error: printed as one line."""


def load_config(path: str, overrides: list[str]) -> ml_collections.ConfigDict:
  """The config file `path` (`file.py[:arg]`) with `--config.key=value` overrides, as `atr_jax.main` reads it."""
  if not os.path.isfile(path.split(":")[0]):
    raise UsageError(f"--config {path}: no such config file")
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    raise UsageError(f"unexpected arguments {bad} (only --config.<key>=<value> overrides may follow)")
  argv = ["moments", f"--config={path}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=flag_values, lock_config=True, sys_argv=argv)
  try:
    flag_values(argv)
  except (flags.Error, KeyError, AttributeError) as e:
    message = f"{e}".replace("\n", " ")
    raise UsageError(f"--config {path}: {message} (each --config.<key>=<value> must name a key of the config)") from e
  return flag_values.config


def split_paths(moments_config, split: str) -> tuple[str, str]:
  """(annotations, audio folder) of a split name (`moments.data`)."""
  data = moments_config.data
  return (
    os.path.join(data.dir, data.annotations.format(split=split)),
    os.path.join(data.dir, data.audio_dir.format(split=split)),
  )


def prepare_encoder(config: ml_collections.ConfigDict) -> str:
  """The encoder workdir (absolute), trained first when missing and `moments.train_encoder`."""
  workdir = config.moments.encoder_workdir
  if not workdir:
    raise UsageError("config.moments.encoder_workdir is empty: name a trained atr-jax workdir")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    model_identity.read_workdir(workdir)[1].close()
  except FileNotFoundError as e:
    if not config.moments.train_encoder:
      raise UsageError(f"config.moments.encoder_workdir={workdir} holds no trained atr-jax run ({e})") from e
    from atr_jax import train

    print(f"training the encoder into {workdir} (config.moments.train_encoder)", flush=True)
    train.train_and_evaluate(config, workdir)
  return workdir


def prepare_data(config: ml_collections.ConfigDict) -> None:
  """Synthesises the moment set into `moments.data.dir` when absent and `moments.data.synthesize`, from
  `synthetic_clips_dir` (generated first when absent and `synthetic_clip_seconds` > 0) or `config.data.raw_dir`."""
  data = config.moments.data
  if not data.dir:
    raise UsageError("config.moments.data.dir is empty: name the moment data folder")
  if os.path.isdir(data.dir):
    return
  if not data.synthesize:
    raise UsageError(f"config.moments.data.dir={data.dir} does not exist")
  clips_dir = os.path.expanduser(data.synthetic_clips_dir or config.data.raw_dir)
  if not os.path.isdir(clips_dir) and data.synthetic_clip_seconds > 0:
    if not data.synthetic_clips_dir:
      raise UsageError("config.moments.data.synthetic_clip_seconds needs config.moments.data.synthetic_clips_dir")
    from data_pipelines import datasets

    print(f"generating {data.synthetic_clip_seconds} s synthetic clips into {clips_dir}", flush=True)
    datasets.generate_synthetic(clips_dir, config.data.synthetic, data.synthetic_clip_seconds)
  if not os.path.isdir(clips_dir):
    raise UsageError(f"config.moments.data.synthetic_clips_dir (or config.data.raw_dir) {clips_dir} does not exist")
  from data_pipelines import moments as moment_data

  print(f"synthesising the moment set {data.dir} from {clips_dir}", flush=True)
  manifest = moment_data.synthesize(
    clips_dir, data.dir, duration_s=data.synthetic_duration, seed=data.synthetic_seed, overwrite=False
  )
  for split, counts in manifest["splits"].items():
    print(f"  {split}: {counts['recordings']} recordings, {counts['queries']} queries", flush=True)


def read_workdir(workdir: str) -> tuple[ml_collections.ConfigDict, str]:
  """(the `moments` config, the encoder workdir) of a moment workdir."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise UsageError(f"--workdir {workdir} is not a moment workdir (no {CONFIG_FILE}; train one with `train`)")
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  return ml_collections.ConfigDict(saved["moments"]), saved["encoder_workdir"]


def split_features(encoder: str, moments_config, annotations: str, audio_dir: str) -> features.SplitFeatures:
  if not os.path.isfile(annotations):
    raise UsageError(f"--annotations {annotations}: no such file")
  try:
    return features.split_features(encoder, annotations, audio_dir, features_name=moments_config.data.features)
  except clip_builder.NoUsableClip:
    raise UsageError(f"{annotations}: no query has a readable recording in {audio_dir}") from None


def baseline_metrics(encoder_model, moments_config, split: features.SplitFeatures) -> dict:
  """The sliding-window baseline's metrics on `split` (sentence embeddings from the encoder's `embed_text`)."""
  embeddings = encoder_model.embed_text([q.query for q in split.queries])
  by_qid = {q.qid: e for q, e in zip(split.queries, embeddings)}
  predictions = sliding_window.predict(split.frames, by_qid, split.queries, split.hop_s, moments_config.sliding_window)
  return metrics.evaluate(predictions, _truth(split.queries))


def _truth(queries) -> list[dict]:
  return [{"qid": q.qid, "duration": q.duration, "relevant_windows": [list(w) for w in q.windows]} for q in queries]


def table(title: str, columns: dict[str, dict]) -> str:
  """The metrics of each column (name -> metrics) as a text table."""
  lines = [title, f"{'metric':<10}" + "".join(f"{name:>16}" for name in columns)]
  for key in METRIC_KEYS:
    lines.append(f"{key:<10}" + "".join(f"{values[key]:>16.2f}" for values in columns.values()))
  return "\n".join(lines)


def command_train(args, overrides) -> None:
  import atr_jax

  config = load_config(args.config, overrides)
  logging.set_verbosity(logging.INFO if args.verbose else logging.WARNING)
  encoder = prepare_encoder(config)
  prepare_data(config)
  moments_config = config.moments
  splits = {}
  for name in (moments_config.data.train_split, moments_config.data.val_split):
    print(f"features of {name} (cached)", flush=True)
    splits[name] = split_features(encoder, moments_config, *split_paths(moments_config, name))
  os.makedirs(args.workdir, exist_ok=True)
  saved = {"moments": moments_config.to_dict(), "encoder_workdir": encoder}
  write_text_atomically(os.path.join(args.workdir, CONFIG_FILE), json.dumps(saved, indent=1))
  train_split, val_split = splits[moments_config.data.train_split], splits[moments_config.data.val_split]
  print(f"training the moment model on {len(train_split.queries)} queries", flush=True)
  best = moment_train.train_and_evaluate(config, args.workdir, train_split, val_split, train_split.hop_s)
  baseline = baseline_metrics(atr_jax.load(encoder), moments_config, val_split)
  print(
    table(f"validation ({moments_config.data.val_split}, best checkpoint)", {"model": best, "sliding window": baseline})
  )


def _model(workdir: str):
  moments_config, encoder = read_workdir(workdir)
  return moments_config, encoder, moment_train.restore_best_params(workdir)


def command_evaluate(args) -> None:
  import atr_jax

  moments_config, encoder, params = _model(args.workdir)
  split = split_features(encoder, moments_config, args.annotations, args.audio_dir)
  results, _ = moment_train.evaluate(
    params, moments_config, split.frames, split.tokens, split.queries, split.hop_s, sharding.create_mesh()
  )
  baseline = baseline_metrics(atr_jax.load(encoder), moments_config, split)
  print(table(f"{args.annotations} ({len(split.queries)} queries)", {"model": results, "sliding window": baseline}))
  record = {**{k: results[k] for k in METRIC_KEYS}, "sliding_window": {k: baseline[k] for k in METRIC_KEYS}}
  record.update(annotations=os.path.abspath(args.annotations), audio_dir=os.path.abspath(args.audio_dir))
  write_text_atomically(os.path.join(args.workdir, RESULTS_FILE), json.dumps(record, indent=1))
  print(f"written to {os.path.join(args.workdir, RESULTS_FILE)}")


def command_predict(args) -> None:
  from data_pipelines import features as audio_features
  from data_pipelines.features import SAMPLE_RATE
  from data_pipelines.moment_annotations import MomentQuery

  moments_config, encoder, params = _model(args.workdir)
  if not os.path.isfile(args.audio):
    raise UsageError(f"--audio {args.audio}: no such file")
  if not args.query.strip():
    raise UsageError("--query is empty")
  chosen = features.setting(moments_config.data.features)
  featurizer = features.Featurizer(encoder, chosen)
  waveform = audio_features.load_audio(args.audio)
  vid = os.path.splitext(os.path.basename(args.audio))[0]
  query = MomentQuery("query", args.query, vid, len(waveform) / SAMPLE_RATE, ())
  frames = {vid: featurizer.frames(waveform)}
  tokens = {query.qid: featurizer.tokens([args.query])[0]}
  mesh = sharding.create_mesh()
  (prediction,) = moment_train.predict(params, moments_config, frames, tokens, [query], chosen.hop_s, mesh)
  print(f"{args.audio} ({query.duration:.1f} s), {args.query!r}:")
  for rank, (start, end, score) in enumerate(prediction["pred_relevant_windows"][: args.top_k], 1):
    print(f"{rank:>3}. {start:7.1f} - {end:7.1f} s  score {score:.3f}")


def submission_windows(windows) -> list[list[int]]:
  """Ranked [start, end, score] -> [start, end] clamped to [0, SUBMISSION_MAX_S] and rounded to whole seconds."""
  clamped = np.clip(np.asarray(windows, np.float64).reshape(-1, 3)[:, :2], 0.0, SUBMISSION_MAX_S)
  return np.floor(clamped + 0.5).astype(int).tolist()


def command_submission(args) -> None:
  moments_config, encoder, params = _model(args.workdir)
  split = split_features(encoder, moments_config, args.annotations, args.audio_dir)
  predictions = moment_train.predict(
    params, moments_config, split.frames, split.tokens, split.queries, split.hop_s, sharding.create_mesh()
  )
  lines = []
  for q, prediction in zip(split.queries, predictions):
    windows = submission_windows(prediction["pred_relevant_windows"])
    lines.append(json.dumps({"qid": q.qid, "query": q.query, "vid": q.vid, "pred_relevant_windows": windows}))
  write_text_atomically(args.output, "".join(line + "\n" for line in lines))
  print(f"{len(lines)} queries written to {args.output}")
  for vid, reason in split.skipped:
    print(f"skipped {vid}: {reason}")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m atr_jax.moments", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  command = commands.add_parser("train", help="train a moment model (--config.<key>=<value> overrides may follow)")
  command.add_argument("--config", required=True, help="configs/<name>.py[:arg]")
  command.add_argument("--workdir", required=True, help="the moment workdir to write")
  command.add_argument("--verbose", action="store_true", help="log every validation and feature step")
  for name, help_text in (("evaluate", "metrics of one split"), ("submission", "the challenge JSONL of one split")):
    command = commands.add_parser(name, help=help_text)
    command.add_argument("--workdir", required=True, help="a trained moment workdir")
    command.add_argument("--annotations", required=True, help="lighthouse JSONL or CASTELLA JSON")
    command.add_argument("--audio_dir", required=True, help="the recordings, <vid>.<ext>")
    if name == "submission":
      command.add_argument("--output", required=True, help="the JSONL to write")
  command = commands.add_parser("predict", help="the moments of one recording for one sentence")
  command.add_argument("--workdir", required=True, help="a trained moment workdir")
  command.add_argument("--audio", required=True, help="a recording, any length")
  command.add_argument("--query", required=True, help="the sentence")
  command.add_argument("--top_k", type=int, default=5, help="moments printed")
  args, overrides = parser.parse_known_args(argv)
  if not getattr(args, "verbose", False):
    tfds.disable_progress_bar()  # Its per-split bars while a split is prepared; the preparation shows its own.
  if overrides and args.command != "train":
    parser.error(f"unrecognized arguments: {' '.join(overrides)}")
  try:
    if args.command == "train":
      command_train(args, overrides)
    elif args.command == "evaluate":
      command_evaluate(args)
    elif args.command == "predict":
      command_predict(args)
    else:
      command_submission(args)
  except (UsageError, ValueError, OSError, checkpointing.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
