"""Frame and token features of a moment-retrieval split from a trained atr-jax workdir, computed once and cached.

Audio: each recording is cut into windows (`SETTINGS`; `clap_like`, the AM-DETR baseline's: 1 s windows at 1 s hop;
a last window shorter than half a window is dropped), each window is embedded as a clip of its own by the workdir's
audio tower and head (its stored form computed from the window's samples, as for a 1 s file; L2-normalised), and
two position values are appended: the window's start and end divided by the recording's length. A recording gives
float32 (T, D + 2).
Text: per-token features of each query: the text tower's last hidden states (before pooling) put through the
text projection head and L2-normalised, the padding positions dropped: float32 (L, D), L counting the special tokens.
Projected (rather than the tower's raw width) so that frames and tokens live in the same D-dimensional space the
dual encoder was trained in, whatever the text tower's width; the head was trained on the pooled state, which is
one of these tokens (cls pooling) or their mean (mean pooling).

Input: the split prepared by `data_pipelines.moment_builder` (prepared first when missing, and again when the
annotation file or a recording changed): the recordings' waveforms (int16 at full scale 32767: a wav's samples
within one step of 16 bits) come from its records, the queries from its table (`moment_builder.split_queries`), the
recordings it skipped (audio missing or unreadable) and why from its report; their queries are left out.

Cache (the features depend on a model, so they are not part of the prepared records): a folder per split, by default
`<annotations folder>/features/<setting>-<8 hex of the workdir path>/<annotations file stem>/`, holding
`fingerprint.json` (the setting, the model: `model_identity`'s record of the workdir's best checkpoint step and
embedding config, and the prepared split's fingerprint: its version and the SHA-1 of its sources' fingerprint),
`audio-<k>.npz` shards of SHARD_RECORDINGS recordings in the prepared split's order (`vids`, `frames` concatenated,
`offsets`), `tokens.npz` (`qids`, `tokens`, `offsets`) and `done.json` (the shards). A cache whose fingerprint
differs (another checkpoint step or model config, a split prepared again) is deleted and computed again; a killed
computation resumes at its first missing shard.

Command line (computes or checks the cache of one split; `--features clap_like` is the only setting so far):
  python -m atr_jax.moments.features --workdir RUN --annotations OUT/val.jsonl --audio_dir OUT/val

Interface for the moment model (plain numpy): `SplitFeatures.frames[vid]` (T, D + 2), `SplitFeatures.tokens[qid]`
(L, D), `SplitFeatures.queries` (`MomentQuery`: windows in seconds).
"""

from atr_jax import xla_flags

xla_flags.set_defaults()  # Before jax is imported.

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tqdm  # noqa: E402
from absl import logging  # noqa: E402

import atr_jax  # noqa: E402
from atr_jax import model_identity  # noqa: E402
from atr_jax.atomic_files import write_atomically, write_text_atomically  # noqa: E402
from atr_jax.models.dual_encoder import build_model, l2_normalize  # noqa: E402
from data_pipelines import audio_forms, moment_builder  # noqa: E402
from data_pipelines.features import SAMPLE_RATE  # noqa: E402
from data_pipelines.moment_annotations import MomentQuery  # noqa: E402

SHARD_RECORDINGS = 256
FINGERPRINT_FILE, DONE_FILE, TOKENS_FILE = "fingerprint.json", "done.json", "tokens.npz"
MIN_LAST_WINDOW = 0.5  # A last window shorter than this share of a window is dropped.


@dataclasses.dataclass(frozen=True)
class Setting:
  window_s: float
  hop_s: float


SETTINGS = {"clap_like": Setting(window_s=1.0, hop_s=1.0)}


@dataclasses.dataclass
class SplitFeatures:
  """A split's features: frames by vid, tokens by qid, the queries whose recording has frames, and the recordings
  skipped ((vid, reason))."""

  frames: dict[str, np.ndarray]
  tokens: dict[str, np.ndarray]
  queries: list[MomentQuery]
  skipped: list[tuple[str, str]]
  hop_s: float  # Frame t starts at t * hop_s seconds.


def setting(name: str) -> Setting:
  if name not in SETTINGS:
    raise ValueError(f"--features={name!r} is not a feature setting (choices: {sorted(SETTINGS)})")
  return SETTINGS[name]


def window_bounds(num_samples: int, chosen: Setting) -> list[tuple[int, int]]:
  """(first, end) samples of each window of a recording of `num_samples` samples."""
  window, hop = int(round(chosen.window_s * SAMPLE_RATE)), int(round(chosen.hop_s * SAMPLE_RATE))
  bounds = []
  for first in range(0, num_samples, hop):
    end = min(first + window, num_samples)
    if end - first < MIN_LAST_WINDOW * window and bounds:
      break
    bounds.append((first, end))
  return bounds


class Featurizer:
  """The workdir's towers embedding windows and query tokens (its best checkpoint, restored by `atr_jax.load`)."""

  def __init__(self, workdir: str, chosen: Setting):
    self.model = atr_jax.load(workdir)
    self.setting = chosen
    model = build_model(self.model.config.model)

    def tokens(variables, input_ids, attention_mask):
      def per_token(module, input_ids, attention_mask):
        hidden, _ = module.text(input_ids, attention_mask, False)
        return l2_normalize(module.text_head(hidden))

      return model.apply(variables, input_ids, attention_mask, method=per_token)

    self._tokens = jax.jit(tokens)

  def frames(self, waveform: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """float32 (T, D + 2) of a 32 kHz mono waveform."""
    bounds = window_bounds(len(waveform), self.setting)
    form = self.model.audio_form
    embedded = self.model.embed_clips([form.compute(waveform[a:b]) for a, b in bounds], batch_size)
    positions = np.array(bounds, np.float64) / len(waveform)
    return np.concatenate([embedded, positions.astype(np.float32)], axis=1).astype(np.float32)

  def tokens(self, texts: list[str], batch_size: int = 64) -> list[np.ndarray]:
    """float32 (L_i, D) of each text: its non-padding tokens."""
    out = []
    for start in range(0, len(texts), batch_size):
      batch = self.model.encode_captions(texts[start : start + batch_size])
      values = np.asarray(self._tokens(self.model.variables, batch["input_ids"], batch["attention_mask"]))
      out += [row[mask.astype(bool)] for row, mask in zip(values.astype(np.float32), batch["attention_mask"])]
    return out


def default_cache_dir(annotations: str, workdir: str, features_name: str) -> str:
  digest = hashlib.sha1(os.path.abspath(os.path.expanduser(workdir)).encode("utf-8")).hexdigest()[:8]
  stem = os.path.splitext(os.path.basename(annotations))[0]
  return os.path.join(os.path.dirname(os.path.abspath(annotations)), "features", f"{features_name}-{digest}", stem)


def fingerprint(prepared: moment_builder.MomentRecordings, identity: dict, features_name: str) -> dict:
  """What the cached features depend on: the setting, the model and the prepared split."""
  return {
    "features": features_name,
    "setting": dataclasses.asdict(SETTINGS[features_name]),
    "model": identity,
    "prepared": moment_builder.fingerprint(prepared),
  }


def _read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _describe_change(old: dict | None, new: dict) -> str:
  if old is None:
    return "no cache yet"
  return ", ".join(key for key in new if old.get(key) != new[key]) + " changed"


def _save_arrays(path: str, keys: list[str], arrays: list[np.ndarray], key_name: str, value_name: str, width: int):
  """Writes `arrays` concatenated (`value_name`), their `keys` (`key_name`) and their row offsets."""
  offsets = np.cumsum([0] + [len(a) for a in arrays]).astype(np.int64)
  values = np.concatenate(arrays) if arrays else np.zeros((0, width), np.float32)
  named = {key_name: np.array(keys, dtype=str), value_name: values, "offsets": offsets}
  write_atomically(path, lambda f: np.savez(f, **named))


def _load_arrays(path: str, key_name: str, value_name: str) -> dict[str, np.ndarray]:
  with np.load(path) as data:
    keys, values, offsets = data[key_name].tolist(), data[value_name], data["offsets"]
  return {key: values[offsets[i] : offsets[i + 1]] for i, key in enumerate(keys)}


def split_features(
  workdir: str,
  annotations: str,
  audio_dir: str,
  *,
  features_name: str = "clap_like",
  cache_dir: str | None = None,
  batch_size: int = 64,
) -> SplitFeatures:
  """The features of the queries of `annotations` (lighthouse JSONL or CASTELLA JSON; bad windows are clipped or
  dropped and reported) and of their recordings `audio_dir/<vid>.<ext>`, through the prepared split
  (`moment_builder.prepare_split`), from the cache when it is current."""
  chosen = setting(features_name)
  prepared = moment_builder.prepare_split(annotations, audio_dir)
  identity = model_identity.of_workdir(workdir).record()
  cache_dir = cache_dir or default_cache_dir(annotations, workdir, features_name)
  current = fingerprint(prepared, identity, features_name)
  stored = _read_json(os.path.join(cache_dir, FINGERPRINT_FILE))
  if stored != current:
    logging.info("moment features %s: computing (%s)", cache_dir, _describe_change(stored, current))
    shutil.rmtree(cache_dir, ignore_errors=True)
    os.makedirs(cache_dir)
    write_text_atomically(os.path.join(cache_dir, FINGERPRINT_FILE), json.dumps(current))
  queries = moment_builder.split_queries(prepared)
  if not os.path.exists(os.path.join(cache_dir, DONE_FILE)):
    _compute(workdir, chosen, prepared, queries, cache_dir, batch_size)
  frames = {}
  for shard in _read_json(os.path.join(cache_dir, DONE_FILE))["shards"]:
    frames.update(_load_arrays(os.path.join(cache_dir, shard), "vids", "frames"))
  tokens = _load_arrays(os.path.join(cache_dir, TOKENS_FILE), "qids", "tokens")
  return SplitFeatures(frames, tokens, queries, moment_builder.skipped_recordings(prepared), chosen.hop_s)


def _compute(workdir, chosen, prepared, queries, cache_dir, batch_size) -> None:
  """Writes the missing audio shards, the tokens and done.json into `cache_dir`."""
  featurizer = Featurizer(workdir, chosen)
  width = featurizer.model.embed_dim
  total = prepared.info.splits[moment_builder.SPLIT].num_examples
  shards = [f"audio-{number:05d}.npz" for number in range(-(-total // SHARD_RECORDINGS))]
  done = next((k for k, name in enumerate(shards) if not os.path.exists(os.path.join(cache_dir, name))), len(shards))
  form = audio_forms.WAVEFORM
  with tqdm.tqdm(total=total, initial=done * SHARD_RECORDINGS, desc="moment features", unit="recording") as progress:
    vids, arrays = [], []
    for record in moment_builder.records(prepared, skip=done * SHARD_RECORDINGS):
      vids.append(record["vid"].decode("utf-8"))
      arrays.append(featurizer.frames(form.to_float32(record[form.name]), batch_size))
      progress.update()
      if len(vids) == SHARD_RECORDINGS or done * SHARD_RECORDINGS + len(vids) == total:
        _save_arrays(os.path.join(cache_dir, shards[done]), vids, arrays, "vids", "frames", width + 2)
        done, vids, arrays = done + 1, [], []
  _save_arrays(
    os.path.join(cache_dir, TOKENS_FILE),
    [q.qid for q in queries],
    featurizer.tokens([q.query for q in queries], batch_size),
    "qids",
    "tokens",
    width,
  )
  write_text_atomically(os.path.join(cache_dir, DONE_FILE), json.dumps({"shards": shards}))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m atr_jax.moments.features", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a trained atr-jax workdir")
  parser.add_argument("--annotations", required=True, help="lighthouse JSONL or CASTELLA JSON of one split")
  parser.add_argument("--audio_dir", required=True, help="the split's recordings, <vid>.<ext>")
  parser.add_argument("--features", default="clap_like", choices=sorted(SETTINGS), help="window setting")
  parser.add_argument("--cache_dir", default=None, help="default: features/<setting>-<workdir hash>/ beside it")
  args = parser.parse_args(argv)
  try:
    split = split_features(
      args.workdir, args.annotations, args.audio_dir, features_name=args.features, cache_dir=args.cache_dir
    )
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  frames = sum(len(f) for f in split.frames.values())
  print(f"{len(split.frames)} recordings ({frames} frames), {len(split.tokens)} queries")
  for vid, reason in split.skipped:
    print(f"skipped {vid}: {reason}")


if __name__ == "__main__":
  main()
