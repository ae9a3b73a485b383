"""Moment-retrieval data: the Clotho-Moment-style synthesiser's invariants (windows inside the recording and apart, the
event's audio at its window by cross-correlation, split carry-over, determinism, no silent background, broken clips
skipped and reported, background cuts where their vid says) and the annotation readers on fixtures shaped like
CASTELLA's and Clotho-Moment's real files (bad windows clipped or dropped and reported)."""

import json
import os

import numpy as np
import pytest
import soundfile as sf

from data_pipelines import moment_synthesis, moments, synthetic
from data_pipelines.moment_annotations import MomentQuery, read_annotations, read_castella_json, read_jsonl, write_jsonl

SR = 32000
DURATION = 12
NUM_CLIPS = {"development": 14, "validation": 6, "evaluation": 6}


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("moment_clips") / "raw"
  synthetic.generate(str(root), NUM_CLIPS, seed=5, duration_s=2.5)
  return str(root)


@pytest.fixture(scope="module")
def moment_set(clips_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("moment_set") / "out")
  moments.synthesize(clips_dir, out, duration_s=DURATION, seed=3)
  return out


def _queries(out: str, split: str) -> list[dict]:
  with open(os.path.join(out, f"{split}.jsonl")) as f:
    return [json.loads(line) for line in f]


def _manifest(out: str) -> dict:
  with open(os.path.join(out, moments.MANIFEST_FILE)) as f:
    return json.load(f)


def _trimmed_reference(path: str) -> np.ndarray:
  """The foreground as SPEC 12 defines it, in float64: 1 s blocks, the span above mean power - 5 dB, peak 1."""
  audio, rate = sf.read(path, dtype="float64")
  assert rate == SR
  blocks = [audio[i : i + SR] for i in range(0, len(audio), SR)]
  threshold = 10 * np.log10(np.mean(audio**2)) - 5
  loud = [k for k, b in enumerate(blocks) if 10 * np.log10(np.mean(b**2) + 1e-30) > threshold]
  span = audio[loud[0] * SR : (loud[-1] + 1) * SR]
  return span / np.max(np.abs(span))


def test_lighthouse_fields_and_windows_inside_and_apart(moment_set):
  for split in ("train", "val", "test"):
    by_vid = {}
    for line in _queries(moment_set, split):
      assert set(line) == {"qid", "query", "duration", "vid", "relevant_windows", "fg_dB"}
      assert isinstance(line["qid"], str) and line["duration"] == DURATION and line["query"]
      assert -5 <= line["fg_dB"] <= 5
      [[start, end]] = line["relevant_windows"]
      assert 0 <= start < end <= DURATION
      assert end - start >= 0.95  # Events are at least 1 s (0.1 s rounding of the end).
      assert round(start * 10) == pytest.approx(start * 10)  # The 0.1 s grid.
      by_vid.setdefault(line["vid"], []).append((start, end))
      assert os.path.isfile(os.path.join(moment_set, split, line["vid"] + ".wav"))
    for windows in by_vid.values():
      assert 1 <= len(windows) <= 3
      windows.sort()
      assert all(previous[1] <= following[0] for previous, following in zip(windows, windows[1:]))
  qids = [q["qid"] for split in ("train", "val", "test") for q in _queries(moment_set, split)]
  assert qids == [str(i) for i in range(len(qids))]


def test_the_event_audio_is_at_its_window(moment_set, clips_dir):
  sources = _manifest(moment_set)["events"]
  folders = {"train": "development", "val": "validation", "test": "evaluation"}
  checked = 0
  for split in ("train", "val", "test"):
    for line in _queries(moment_set, split):
      mix, rate = sf.read(os.path.join(moment_set, split, line["vid"] + ".wav"), dtype="float64")
      assert rate == SR and mix.ndim == 1 and len(mix) == DURATION * SR
      assert np.max(np.abs(mix)) == pytest.approx(1.0, abs=1e-4)  # Peak-normalised.
      foreground = _trimmed_reference(os.path.join(clips_dir, folders[split], sources[line["qid"]]["clip"]))
      size = 1 << (len(mix) + len(foreground)).bit_length()
      correlation = np.fft.irfft(np.fft.rfft(mix, size) * np.conj(np.fft.rfft(foreground, size)), size)[: len(mix)]
      start, end = line["relevant_windows"][0]
      assert abs(int(np.argmax(correlation)) - round(start * SR)) <= 2, line
      assert end == pytest.approx(min(DURATION, start + len(foreground) / SR), abs=0.051)
      checked += 1
  assert checked >= 10


def test_splits_carry_over_and_each_clip_is_used_once(moment_set):
  manifest = _manifest(moment_set)
  prefix = {"train": "synth_development_", "val": "synth_validation_", "test": "synth_evaluation_"}
  for split in ("train", "val", "test"):
    for line in _queries(moment_set, split):
      assert manifest["events"][line["qid"]]["clip"].startswith(prefix[split])
  clips = [event["clip"] for event in manifest["events"].values()]
  assert len(set(clips)) == len(clips)
  for split, clotho in (("train", "development"), ("val", "validation"), ("test", "evaluation")):
    counts = manifest["splits"][split]
    skipped = [s for s in manifest["skipped"] if s["split"] == split]
    assert counts["clips_used"] + len(skipped) == counts["clips"] == NUM_CLIPS[clotho]
    assert counts["queries"] == counts["clips_used"]


def _folder_bytes(folder: str) -> dict:
  found = {}
  for root, _, names in os.walk(folder):
    for name in names:
      with open(os.path.join(root, name), "rb") as f:
        found[os.path.relpath(os.path.join(root, name), folder)] = f.read()
  return found


def test_same_seed_same_files_other_seed_other_files(moment_set, clips_dir, tmp_path):
  moments.synthesize(clips_dir, str(tmp_path / "again"), duration_s=DURATION, seed=3)
  moments.synthesize(clips_dir, str(tmp_path / "other"), duration_s=DURATION, seed=4)
  first, again = _folder_bytes(moment_set), _folder_bytes(str(tmp_path / "again"))
  first.pop(moments.MANIFEST_FILE), again.pop(moments.MANIFEST_FILE)  # It names the output folder.
  assert first == again
  other = _folder_bytes(str(tmp_path / "other"))
  assert _queries(moment_set, "train") != _queries(str(tmp_path / "other"), "train")
  assert first["train.jsonl"] != other["train.jsonl"]


def test_procedural_background_is_never_silent(moment_set):
  for seed in range(3):
    ambience = moment_synthesis.procedural_ambience(30 * SR, np.random.default_rng(seed))
    block_rms = np.sqrt(np.mean(ambience.reshape(-1, SR // 20) ** 2, axis=1))  # 50 ms blocks.
    assert block_rms.min() > 10 ** (-12 / 20) * np.median(block_rms)
  for split in ("train", "test"):
    for line in _queries(moment_set, split)[:3]:
      mix, _ = sf.read(os.path.join(moment_set, split, line["vid"] + ".wav"), dtype="float64")
      assert np.sqrt(np.mean(mix.reshape(-1, SR // 10) ** 2, axis=1)).min() > 1e-3  # Above -60 dBFS everywhere.


def test_a_broken_clip_is_skipped_and_reported(clips_dir, tmp_path):
  import shutil

  raw = str(tmp_path / "raw")
  shutil.copytree(clips_dir, raw)
  broken = os.path.join(raw, "validation", synthetic.clip_file_name("validation", 2))
  with open(broken, "wb") as f:
    f.write(b"RIFF not a wav at all")
  manifest = moments.synthesize(raw, str(tmp_path / "out"), duration_s=DURATION, seed=3)
  reasons = {s["item"]: s["reason"] for s in manifest["skipped"] if s["split"] == "val"}
  assert reasons[os.path.basename(broken)].startswith("unreadable_audio")
  assert manifest["splits"]["val"]["clips_used"] == NUM_CLIPS["validation"] - len(reasons)
  assert os.path.basename(broken) not in [event["clip"] for event in manifest["events"].values()]


def test_background_cuts_are_where_their_vid_says(clips_dir, tmp_path):
  background_dir = tmp_path / "walks"
  background_dir.mkdir()
  rng = np.random.default_rng(0)
  walk = 0.3 * np.sin(2 * np.pi * 3 * np.arange(40 * SR) / SR) * rng.uniform(0.5, 1, 40 * SR)
  sf.write(background_dir / "Walk.wav", walk, SR, subtype="FLOAT")
  (background_dir / "Broken.wav").write_bytes(b"not audio")
  manifest = moments.synthesize(
    clips_dir, str(tmp_path / "out"), background_dir=str(background_dir), duration_s=8, seed=1
  )
  assert any(s["item"].endswith("Broken.wav") for s in manifest["skipped"])
  lines = _queries(str(tmp_path / "out"), "val")
  vids = {line["vid"] for line in lines}
  assert len(vids) == manifest["splits"]["val"]["recordings"]
  for vid in vids:
    name, start, end = vid.rsplit("_", 2)
    assert name == "Walk" and float(end) - float(start) == 8
    mix, _ = sf.read(str(tmp_path / "out" / "val" / f"{vid}.wav"), dtype="float64")
    cut = walk[int(float(start)) * SR : int(float(end)) * SR]
    events = np.zeros(len(mix), bool)
    for line in lines:
      if line["vid"] == vid:
        s, e = line["relevant_windows"][0]
        events[int(s * SR) : int(e * SR) + SR // 10] = True
    quiet = ~events
    assert quiet.sum() > SR // 2
    assert np.corrcoef(mix[quiet], cut[quiet])[0, 1] > 0.99  # Only the attenuated cut plays between events.
    # The gains: mix = k (cut 10^(background_db / 20) + sum of g foreground), g = RMS(cut) 10^(fg_dB / 20) / RMS(fg).
    scale = mix[quiet] @ cut[quiet] / (cut[quiet] @ cut[quiet])
    for line in lines:
      if line["vid"] == vid:
        event = manifest["events"][line["qid"]]
        assert -25 <= event["background_db"] <= -15
        k = scale / 10 ** (event["background_db"] / 20)
        foreground = _trimmed_reference(os.path.join(clips_dir, "validation", event["clip"]))
        first = round(line["relevant_windows"][0][0] * SR)
        rest = mix[first : first + len(foreground)] - scale * cut[first : first + len(foreground)]
        gain = rest @ foreground / (foreground @ foreground) / k
        measured = 20 * np.log10(gain * np.sqrt(np.mean(foreground**2)) / np.sqrt(np.mean(cut**2)))
        assert measured == pytest.approx(line["fg_dB"], abs=0.1)


def test_cli_user_error_is_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    moments.main(["synthesize", "--clips_dir", str(tmp_path / "absent"), "--out_dir", str(tmp_path / "out")])
  assert exit_info.value.code != 0
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "absent" in err and "Traceback" not in err


# Fixtures shaped like the released files: CASTELLA's json/en/<split>.json and lighthouse's
# data/castella/castella_<split>_release.jsonl and data/clotho_moment/clotho_moment_<split>_release.jsonl.
CASTELLA_JSON = [
  {
    "yid": "-2qHGzHjUOU",
    "global_caption": "Wood creaks, things collide, and metal or machinery whirs and grinds",
    "duration": 94,
    "num_moments": 2,
    "moments": [
      {"local_caption": "Mechanical grinding", "timestamps": [[26, 28], [36, 39], [63, 66], [78, 80], [41, 44]]},
      {"local_caption": "Wood creaks", "timestamps": [[60, 62], [11, 14]]},
    ],
  },
  {
    "yid": "-RKs4NoVRms",
    "global_caption": "A woman speaks as someone sneezes, sniffs, and blows their nose",
    "duration": 300,
    "num_moments": 0,
    "moments": [],
  },
  {
    "yid": "-Pjylzex7oc",
    "global_caption": "A man speaks while another person talks nearby and a train rumbles past",
    "duration": 299,
    "num_moments": 1,
    "moments": [{"local_caption": "A train runs", "timestamps": [[134, 300]]}],
  },
  {
    "yid": "67AE9ZKvECs",
    "global_caption": "Birds chirp",
    "duration": 299,
    "num_moments": 2,
    "moments": [
      {"local_caption": "A bird chirps", "timestamps": [[12, 20], [299, 4800]]},
      {"local_caption": "Nothing left", "timestamps": [[7, 7]]},
    ],
  },
]
CASTELLA_JSONL = [
  {"qid": "-0awng26xQ8_4", "query": "A man signals and drives", "duration": 299, "vid": "-0awng26xQ8",
   "relevant_windows": [[177, 190], [52, 66]]},
  {"qid": "-9WBkdJq104_2", "query": "Frying sizzles", "duration": 298, "vid": "-9WBkdJq104",
   "relevant_windows": [[30, 37], [134, 172], [201, 216], [233, 247], [260, 300]]},
  {"qid": "67AE9ZKvECs_1", "query": "A bird chirps", "duration": 299, "vid": "67AE9ZKvECs",
   "relevant_windows": [[299, 4800]]},
]  # fmt: skip
CLOTHO_MOMENT_JSONL = [
  {"qid": "32701", "query": "Various items being moved around while the a car engine and traffic go in the background.",
   "duration": 60, "vid": "Singapore_8.0_68.0", "relevant_windows": [[0.6, 20.6]], "fg_dB": -0.698513274532198},
  {"qid": "32702", "query": "Water is dripping gurgling, sloshing and being poured.", "duration": 60,
   "vid": "Singapore_8.0_68.0", "relevant_windows": [[32.1, 54.1]], "fg_dB": -2.469317098936675},
]  # fmt: skip


def _write(path, lines, jsonl: bool) -> str:
  with open(path, "w") as f:
    f.write("".join(json.dumps(line) + "\n" for line in lines) if jsonl else json.dumps(lines, indent=2))
  return str(path)


def test_castella_json_reader(tmp_path):
  queries, problems = read_castella_json(_write(tmp_path / "train.json", CASTELLA_JSON, jsonl=False))
  by_qid = {q.qid: q for q in queries}
  assert sorted(by_qid) == ["-2qHGzHjUOU_1", "-2qHGzHjUOU_2", "-Pjylzex7oc_1", "67AE9ZKvECs_1"]  # No "-RKs4NoVRms_*".
  grinding = by_qid["-2qHGzHjUOU_1"]
  assert grinding.query == "Mechanical grinding" and grinding.vid == "-2qHGzHjUOU" and grinding.duration == 94
  assert grinding.windows == ((26, 28), (36, 39), (63, 66), (78, 80), (41, 44))  # File order kept (unsorted).
  assert grinding.fg_db is None
  assert by_qid["-Pjylzex7oc_1"].windows == ((134, 299),)
  assert by_qid["67AE9ZKvECs_1"].windows == ((12, 20),)
  found = {(p.qid, p.window, p.action) for p in problems}
  assert found == {
    ("-Pjylzex7oc_1", (134, 300), "end clipped to 299"),
    ("67AE9ZKvECs_1", (299, 4800), "dropped"),
    ("67AE9ZKvECs_2", (7, 7), "dropped"),
    ("67AE9ZKvECs_2", None, "query dropped"),
  }
  assert all("train.json" in str(p) for p in problems)


def test_lighthouse_jsonl_readers_and_round_trip(tmp_path):
  castella, problems = read_jsonl(_write(tmp_path / "castella_train_release.jsonl", CASTELLA_JSONL, jsonl=True))
  assert [q.qid for q in castella] == ["-0awng26xQ8_4", "-9WBkdJq104_2"]
  assert castella[1].windows[-1] == (260, 298)
  assert {(p.qid, p.window, p.action) for p in problems} == {
    ("-9WBkdJq104_2", (260, 300), "end clipped to 298"),
    ("67AE9ZKvECs_1", (299, 4800), "dropped"),
    ("67AE9ZKvECs_1", None, "query dropped"),
  }
  assert any("line 3" in str(p) for p in problems)
  clotho, problems = read_annotations(_write(tmp_path / "clotho_moment_val_release.jsonl", CLOTHO_MOMENT_JSONL, True))
  assert not problems
  assert clotho[0] == MomentQuery(
    "32701", CLOTHO_MOMENT_JSONL[0]["query"], "Singapore_8.0_68.0", 60.0, ((0.6, 20.6),), -0.698513274532198
  )
  write_jsonl(str(tmp_path / "again.jsonl"), clotho)
  assert [json.loads(line) for line in open(tmp_path / "again.jsonl")] == CLOTHO_MOMENT_JSONL
  assert read_jsonl(str(tmp_path / "again.jsonl"))[0] == clotho


def test_reader_errors_name_file_and_line(tmp_path):
  bad = dict(CASTELLA_JSONL[0])
  del bad["relevant_windows"]
  path = _write(tmp_path / "x.jsonl", [CASTELLA_JSONL[0], bad], jsonl=True)
  with pytest.raises(ValueError, match=r"x\.jsonl line 2: missing field\(s\) \['relevant_windows'\]"):
    read_jsonl(path)
  with pytest.raises(ValueError, match="lighthouse JSONL"):
    read_annotations(str(tmp_path / "x.csv"))
