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

Cache (the prepared features: the clip TFRecord builder does not fit, its records being one clip with its captions and
its features not depending on a model): a folder per split, by default `<annotations folder>/features/<setting>-<8 hex
of the workdir path>/<annotations file stem>/`, holding `fingerprint.json` (the setting, the model: `model_identity`'s
record of the workdir's best checkpoint step and embedding config, each recording's path, size and modification time,
and the SHA-1 of the queries), `audio-<k>.npz` shards of SHARD_RECORDINGS recordings (`vids`, `frames` concatenated,
`offsets`, `skipped`), `tokens.npz` (`qids`, `tokens`, `offsets`) and `done.json` (the shards, and the recordings
skipped with their reason). A cache whose fingerprint differs (another checkpoint step or model config, a recording
added, removed or modified, other queries) is deleted and computed again; a killed computation resumes at its first
missing shard. A recording whose audio is missing or unreadable is skipped and reported, and its queries left out.

Command line (computes or checks the cache of one split; `--features clap_like` is the only setting so far):
  python -m atr_jax.moments.features --workdir RUN --annotations OUT/val.jsonl --audio_dir OUT/val

Interface for the moment model (plain numpy): `SplitFeatures.frames[vid]` (T, D + 2), `SplitFeatures.tokens[qid]`
(L, D), `SplitFeatures.queries` (`MomentQuery`: windows in seconds).
"""

from atr_jax import xla_flags

xla_flags.set_defaults()  # Before jax is imported.

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import glob  # noqa: E402
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
from data_pipelines import features  # noqa: E402
from data_pipelines.features import SAMPLE_RATE  # noqa: E402
from data_pipelines.moment_annotations import MomentQuery, read_annotations  # noqa: E402

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


def find_audio(audio_dir: str, vid: str) -> str | None:
  """`audio_dir/<vid>.<audio extension>`, None when there is none."""
  for path in sorted(glob.glob(os.path.join(glob.escape(audio_dir), glob.escape(vid) + ".*"))):
    if os.path.splitext(path)[1].lower() in features.audio_extensions():
      return path
  return None


def default_cache_dir(annotations: str, workdir: str, features_name: str) -> str:
  digest = hashlib.sha1(os.path.abspath(os.path.expanduser(workdir)).encode("utf-8")).hexdigest()[:8]
  stem = os.path.splitext(os.path.basename(annotations))[0]
  return os.path.join(os.path.dirname(os.path.abspath(annotations)), "features", f"{features_name}-{digest}", stem)


def fingerprint(queries: list[MomentQuery], audio: dict, identity: dict, features_name: str) -> dict:
  """What the cached features depend on: the setting, the model, each recording's file (path, size, mtime in ns;
  None when missing) and the query texts by qid."""
  recordings = {}
  for vid, path in audio.items():
    stat = None if path is None else os.stat(path)
    recordings[vid] = None if stat is None else [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]
  texts = json.dumps([[q.qid, q.query] for q in queries], ensure_ascii=False)
  return {
    "features": features_name,
    "setting": dataclasses.asdict(SETTINGS[features_name]),
    "model": identity,
    "recordings": recordings,
    "queries_sha1": hashlib.sha1(texts.encode("utf-8")).hexdigest(),
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
  changed = [key for key in new if key != "recordings" and old.get(key) != new[key]]
  recordings = sum(old.get("recordings", {}).get(vid) != value for vid, value in new["recordings"].items())
  recordings += len(set(old.get("recordings", {})) - set(new["recordings"]))
  return ", ".join(changed + ([f"{recordings} recording(s) changed"] if recordings else [])) or "unchanged"


def _save_arrays(
  path: str, keys: list[str], arrays: list[np.ndarray], key_name: str, value_name: str, width: int, **extra
) -> None:
  """Writes `arrays` concatenated (`value_name`), their `keys` (`key_name`), their row offsets and `extra` strings."""
  offsets = np.cumsum([0] + [len(a) for a in arrays]).astype(np.int64)
  values = np.concatenate(arrays) if arrays else np.zeros((0, width), np.float32)
  named = {key_name: np.array(keys, dtype=str), value_name: values, "offsets": offsets}
  write_atomically(path, lambda f: np.savez(f, **named, **{k: np.array(v) for k, v in extra.items()}))


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
  dropped and logged) and of their recordings `audio_dir/<vid>.<ext>`, from the cache when it is current."""
  chosen = setting(features_name)
  if not os.path.isdir(audio_dir):
    raise FileNotFoundError(f"audio_dir {audio_dir} does not exist (the folder of the recordings of {annotations})")
  queries, problems = read_annotations(annotations)
  for problem in problems:
    logging.warning("%s", problem)
  vids = sorted({q.vid for q in queries})
  audio = {vid: find_audio(audio_dir, vid) for vid in vids}
  identity = model_identity.of_workdir(workdir).record()
  cache_dir = cache_dir or default_cache_dir(annotations, workdir, features_name)
  current = fingerprint(queries, audio, identity, features_name)
  stored = _read_json(os.path.join(cache_dir, FINGERPRINT_FILE))
  if stored != current:
    logging.info("moment features %s: computing (%s)", cache_dir, _describe_change(stored, current))
    shutil.rmtree(cache_dir, ignore_errors=True)
    os.makedirs(cache_dir)
    write_text_atomically(os.path.join(cache_dir, FINGERPRINT_FILE), json.dumps(current))
  if not os.path.exists(os.path.join(cache_dir, DONE_FILE)):
    _compute(workdir, chosen, queries, vids, audio, cache_dir, batch_size)
  done = _read_json(os.path.join(cache_dir, DONE_FILE))
  frames = {}
  for shard in done["shards"]:
    frames.update(_load_arrays(os.path.join(cache_dir, shard), "vids", "frames"))
  tokens = _load_arrays(os.path.join(cache_dir, TOKENS_FILE), "qids", "tokens")
  skipped = [tuple(item) for item in done["skipped"]]
  return SplitFeatures(frames, tokens, [q for q in queries if q.vid in frames], skipped, chosen.hop_s)


def _compute(workdir, chosen, queries, vids, audio, cache_dir, batch_size) -> None:
  """Writes the missing audio shards, the tokens and done.json into `cache_dir`."""
  featurizer = Featurizer(workdir, chosen)
  width = featurizer.model.embed_dim
  shards, skipped = [], []
  groups = [vids[start : start + SHARD_RECORDINGS] for start in range(0, len(vids), SHARD_RECORDINGS)]
  with tqdm.tqdm(total=len(vids), desc="moment features", unit="recording") as progress:
    for number, group in enumerate(groups):
      name = f"audio-{number:05d}.npz"
      shards.append(name)
      path = os.path.join(cache_dir, name)
      if os.path.exists(path):  # Written by a killed run with the same fingerprint.
        with np.load(path) as shard:
          skipped += [tuple(item) for item in json.loads(str(shard["skipped"]))]
        progress.update(len(group))
        continue
      kept, arrays, shard_skipped = [], [], []
      for vid in group:
        try:
          if audio[vid] is None:
            raise features.AudioError(f"no audio file for {vid}", reason="missing_audio")
          arrays.append(featurizer.frames(features.load_audio(audio[vid]), batch_size))
          kept.append(vid)
        except features.AudioError as e:
          logging.warning("moment features: recording %s skipped (%s: %s)", vid, e.reason, e)
          shard_skipped.append((vid, f"{e.reason}: {e}"))
        progress.update()
      _save_arrays(path, kept, arrays, "vids", "frames", width + 2, skipped=json.dumps(shard_skipped))
      skipped += shard_skipped
  _save_arrays(
    os.path.join(cache_dir, TOKENS_FILE),
    [q.qid for q in queries],
    featurizer.tokens([q.query for q in queries], batch_size),
    "qids",
    "tokens",
    width,
  )
  write_text_atomically(os.path.join(cache_dir, DONE_FILE), json.dumps({"shards": shards, "skipped": skipped}))


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
