"""A search page over an index (FastAPI + uvicorn, the optional `[serve]` extra): type a sentence, get the ranked
clips with their scores, a player and a spectrogram each; or pick an indexed clip (or upload a file) and get the
captions ranked for it.

  python -m atr_jax.serve --workdir RUN --index INDEX [--captions CAPTIONS.csv] [--port 8080] [--host 127.0.0.1]

INDEX is a folder written by `python -m atr_jax.retrieve index`; its clips are played from the folder it indexed
(`--audio_dir` if the folder has moved). The "audio to captions" tab ranks the captions of `--captions` (one a line
in a .txt, or a CSV with a `caption` or Clotho's caption_1..5 columns, e.g. clotho_captions_evaluation.csv),
embedded once at start-up, together with any captions typed in the tab's box. Only the files the index lists are
served, from the indexed folder: any other path (`..`, absolute, a link out of the folder) is refused. Queries go
through `atr_jax.api`, so scores are those of `python -m atr_jax.retrieve`. Spectrograms are the model's log-mel
front end (`features.log_mel`) drawn as small PNGs.
"""

from atr_jax import xla_flags

xla_flags.set_defaults()  # Before jax is imported.

import argparse  # noqa: E402
import functools  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402

from atr_jax import console  # noqa: E402

SPECTROGRAM_WIDTH = 240  # Pixels; the 64 mel bands are 64 rows, low frequencies at the bottom.
SPECTROGRAM_RANGE_DB = 80.0  # Levels below a clip's loudest bin by more than this are black.
_COLOURS = np.array([[0, 0, 4], [81, 18, 124], [183, 55, 121], [252, 137, 97], [252, 253, 191]], np.float64)


def png(rgb: np.ndarray) -> bytes:
  """A PNG file (8-bit RGB, no filtering) of the uint8 image `rgb` [height, width, 3]."""
  height, width, _ = rgb.shape

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  rows = b"".join(b"\x00" + row.tobytes() for row in np.ascontiguousarray(rgb, np.uint8))
  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def spectrogram_image(log_mel: np.ndarray) -> np.ndarray:
  """[64, <= SPECTROGRAM_WIDTH, 3] uint8: the log-mel (frames, 64) averaged into columns, scaled over its top
  SPECTROGRAM_RANGE_DB and coloured dark (quiet) to light (loud)."""
  columns = np.array_split(np.asarray(log_mel, np.float64), min(SPECTROGRAM_WIDTH, len(log_mel)))
  image = np.stack([column.mean(axis=0) for column in columns], axis=1)[::-1]
  level = np.clip((image - image.max()) / SPECTROGRAM_RANGE_DB + 1.0, 0.0, 1.0) * (len(_COLOURS) - 1)
  low = np.minimum(np.floor(level).astype(int), len(_COLOURS) - 2)
  weight = (level - low)[..., None]
  return np.round(_COLOURS[low] * (1 - weight) + _COLOURS[low + 1] * weight).astype(np.uint8)


def create_app(model, index_dir: str, captions: list, audio_dir: str | None = None):
  """The FastAPI app serving `index_dir` with `model` (an `atr_jax.api.Model`), ranking `captions` for clips;
  `audio_dir`: where the indexed files are (default: the folder the index names)."""
  from fastapi import FastAPI, File, Form, HTTPException, UploadFile
  from fastapi.responses import FileResponse, HTMLResponse, Response

  from atr_jax import api
  from data_pipelines import features

  api.check_index_matches(index_dir, model.identity)
  embeddings, names = api.read_index(index_dir)
  audio_dir = os.path.realpath(audio_dir or api.read_index_record(index_dir)["audio_dir"])
  if not os.path.isdir(audio_dir):
    raise FileNotFoundError(f"the indexed folder {audio_dir} does not exist: give --audio_dir")
  row_of = {name: row for row, name in enumerate(names)}
  caption_embeddings = model.embed_text(captions) if captions else np.zeros((0, model.embed_dim), np.float32)
  lock = threading.Lock()  # One model call at a time (requests are served from a thread pool).
  app = FastAPI(title="atr-jax search", docs_url=None, redoc_url=None)

  def indexed_file(name: str) -> str:
    """The file of an indexed clip `name`: 404 unless the index lists it, 403 if it resolves out of the folder."""
    if name not in row_of:
      raise HTTPException(404, f"{name!r} is not a clip of the index")
    path = os.path.realpath(os.path.join(audio_dir, name))
    if os.path.commonpath([path, audio_dir]) != audio_dir or not os.path.isfile(path):
      raise HTTPException(403, f"{name!r} is not a file of the indexed folder")
    return path

  def clip_results(ranked) -> list:
    return [
      {"name": name, "score": score, "audio": f"audio/{name}", "spectrogram": f"spectrogram/{name}"}
      for name, score in ranked
    ]

  @app.get("/", response_class=HTMLResponse)
  def page() -> str:
    return _PAGE

  @app.get("/api/clips")
  def clips() -> dict:
    return {"clips": names, "captions": len(captions)}

  @app.get("/api/search")
  def search(q: str, k: int = 10) -> dict:
    if not q.strip():
      raise HTTPException(400, "the query is empty")
    with lock:
      ranked = model.search(q, (embeddings, names), top_k=max(1, min(k, 100)))
    return {"query": q, "results": clip_results(ranked)}

  @app.post("/api/captions")
  def rank_captions(
    clip: str = Form(""), extra: str = Form(""), k: int = Form(10), file: UploadFile | None = File(None)
  ) -> dict:
    typed = [line.strip() for line in extra.splitlines() if line.strip()]
    if not captions and not typed:
      raise HTTPException(400, "no caption to rank: type some, or start the server with --captions FILE")
    with lock:
      if file is not None and file.filename:
        suffix = os.path.splitext(file.filename)[1]
        with tempfile.NamedTemporaryFile(suffix=suffix) as upload:
          upload.write(file.file.read())
          upload.flush()
          try:
            query = model.embed_audio([upload.name])[0]
          except features.AudioError:
            raise HTTPException(400, f"{file.filename} cannot be read as audio") from None
      elif clip in row_of:
        query = embeddings[row_of[clip]]
      elif clip:
        raise HTTPException(404, f"{clip!r} is not a clip of the index")
      else:
        raise HTTPException(400, "pick a clip or upload a file")
      every = np.concatenate([caption_embeddings, model.embed_text(typed) if typed else caption_embeddings[:0]])
      ranked = model.search(query, (every, captions + typed), top_k=max(1, min(k, 100)))
    return {"results": [{"caption": caption, "score": score} for caption, score in ranked]}

  @app.get("/audio/{name:path}")
  def audio(name: str) -> FileResponse:
    return FileResponse(indexed_file(name))

  @functools.lru_cache(maxsize=512)
  def spectrogram_png(path: str) -> bytes:
    return png(spectrogram_image(features.log_mel(features.load_audio(path))))

  @app.get("/spectrogram/{name:path}")
  def spectrogram(name: str) -> Response:
    return Response(spectrogram_png(indexed_file(name)), media_type="image/png")

  return app


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m atr_jax.serve", description="A search page over an index.")
  parser.add_argument("--workdir", required=True, help="training workdir (holds config.json and checkpoints/)")
  parser.add_argument("--index", required=True, help="index folder (python -m atr_jax.retrieve index)")
  parser.add_argument("--captions", help="captions for the audio-to-captions tab (.txt one a line, or .csv)")
  parser.add_argument("--audio_dir", help="the indexed audio folder, if it moved (default: the one the index names)")
  parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
  parser.add_argument("--port", type=int, default=8080, help="port to listen on (0: a free one)")
  parser.add_argument("--verbosity", type=int, default=0, help="1: every log line, TensorFlow's included")
  return parser


def main(argv: list) -> None:
  args = _parser().parse_args(argv[1:])
  try:
    import uvicorn
  except ImportError:
    sys.exit("error: the search page needs FastAPI and uvicorn: pip install -e '.[serve]'")
  import atr_jax
  from atr_jax import api

  try:
    captions = _read_captions(args.captions) if args.captions else []
    api.read_index(args.index)  # Named before the model loads.
    app = create_app(atr_jax.load(args.workdir), args.index, captions, args.audio_dir)
    listening = socket.create_server((args.host, args.port))
  except (OSError, ValueError) as error:  # ValueError: model_identity.ModelMismatch among others.
    sys.exit(f"error: {error}")
  host, port = listening.getsockname()[:2]
  print(f"Serving {args.index} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
  log_level = "info" if args.verbosity >= 1 else "warning"
  uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[listening])


def _read_captions(path: str) -> list:
  from atr_jax import retrieve  # Here: its absl flags are for its own command line.

  captions = retrieve.read_captions(path)
  if not captions:
    raise ValueError(f"--captions={path} holds no caption")
  return captions


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>atr-jax search</title>
<style>
body { font: 15px system-ui, sans-serif; margin: 24px auto; max-width: 960px; color: #222; }
nav button { font-size: 15px; padding: 6px 14px; border: 1px solid #bbb; background: #f4f4f4; cursor: pointer; }
nav button.active { background: #fff; border-bottom-color: #fff; font-weight: 600; }
section { border: 1px solid #bbb; padding: 16px; margin-top: -1px; }
input[type=text] { width: 70%; font-size: 15px; padding: 6px; }
ol { padding-left: 24px; } li { margin: 10px 0; }
.row { display: flex; align-items: center; gap: 12px; flex-wrap: wrap; }
.name { font-family: monospace; min-width: 220px; } .score { color: #555; font-variant-numeric: tabular-nums; }
img { border: 1px solid #ccc; height: 64px; } textarea { width: 70%; }
.error { color: #b00; }
</style></head><body>
<h1>atr-jax search</h1>
<nav><button id="tab-text" class="active">text to audio</button><button id="tab-audio">audio to captions</button></nav>
<section id="text-pane">
  <form id="search-form" class="row"><input type="text" id="query" name="q" placeholder="describe a sound"
    autofocus><button type="submit">search</button></form>
  <p id="status"></p><ol id="results"></ol>
</section>
<section id="audio-pane" hidden>
  <form id="caption-form">
    <p class="row">indexed clip <select id="clip" name="clip"><option value="">(upload instead)</option></select>
      or a file <input type="file" id="file" name="file" accept="audio/*"></p>
    <p>more captions, one a line:<br><textarea id="extra" name="extra" rows="3"></textarea></p>
    <button type="submit">rank captions</button> <span id="caption-count"></span>
  </form>
  <p id="caption-status"></p><ol id="captions"></ol>
</section>
<script>
const $ = (id) => document.getElementById(id);
function show(tab) {
  $("text-pane").hidden = tab !== "text"; $("audio-pane").hidden = tab !== "audio";
  $("tab-text").classList.toggle("active", tab === "text"); $("tab-audio").classList.toggle("active", tab === "audio");
}
$("tab-text").onclick = () => show("text"); $("tab-audio").onclick = () => show("audio");
async function answer(response) {
  const body = await response.json();
  if (!response.ok) throw new Error(body.detail || response.statusText);
  return body;
}
function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}
async function search(query) {
  $("results").replaceChildren(); $("status").textContent = "searching...";
  try {
    const body = await answer(await fetch("api/search?" + new URLSearchParams({q: query, k: 10})));
    for (const result of body.results) {
      const item = element("li", "result"), row = element("div", "row");
      const audio = element("audio"); audio.controls = true; audio.preload = "metadata"; audio.src = result.audio;
      const image = element("img"); image.src = result.spectrogram; image.alt = "spectrogram of " + result.name;
      row.append(element("span", "name", result.name), element("span", "score", result.score.toFixed(4)), audio, image);
      item.append(row); $("results").append(item);
    }
    $("status").textContent = body.results.length + " clips, best first";
  } catch (error) { $("status").textContent = error.message; $("status").className = "error"; }
}
$("search-form").onsubmit = (event) => { event.preventDefault(); search($("query").value); };
$("caption-form").onsubmit = async (event) => {
  event.preventDefault(); $("captions").replaceChildren(); $("caption-status").textContent = "ranking...";
  try {
    const body = await answer(await fetch("api/captions", {method: "POST", body: new FormData($("caption-form"))}));
    for (const result of body.results) {
      const item = element("li", "caption"); item.append(element("span", "score", result.score.toFixed(4) + "  "),
        element("span", "", result.caption)); $("captions").append(item);
    }
    $("caption-status").textContent = "";
  } catch (error) { $("caption-status").textContent = error.message; $("caption-status").className = "error"; }
};
fetch("api/clips").then(answer).then((body) => {
  for (const name of body.clips) {
    const option = element("option", "", name); option.value = name; $("clip").append(option);
  }
  $("caption-count").textContent = "(" + body.captions + " captions from --captions, and those typed)";
});
const query = new URLSearchParams(location.search).get("q");
if (query) { $("query").value = query; search(query); }
</script></body></html>
"""


if __name__ == "__main__":
  console.quiet_tensorflow(sys.argv)
  main(sys.argv)
