"""The search page (`python -m atr_jax.serve`) over HTTP on 127.0.0.1: rankings are the API's, audio and spectrograms
are served from the indexed folder only, audio to captions ranks the caption list; the page itself in headless
chromium; the command line."""

import http.client
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import requests
import soundfile as sf

import atr_jax
from atr_jax import api, retrieve, serve
from data_pipelines import features

uvicorn = pytest.importorskip("uvicorn", reason="the [serve] extra (fastapi, uvicorn, python-multipart) is missing")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = b"a file outside the indexed folder"
QUERY = "a high beep getting louder"


@pytest.fixture(scope="module")
def site(tiny_trained, tmp_path_factory):
  """(base URL, model, index folder, audio folder, captions) of a server in this process on a free port."""
  config, workdir = tiny_trained
  root = tmp_path_factory.mktemp("serve")
  audio_dir = root / "audio"
  shutil.copytree(os.path.join(config.data.raw_dir, config.data.test_split), audio_dir / "clips")
  (root / "secret.txt").write_bytes(SECRET)
  (audio_dir / "notes.txt").write_text("in the folder, not in the index")
  os.symlink(root / "secret.txt", audio_dir / "link.wav")  # Listed below, but leads out of the folder.
  model = atr_jax.load(workdir)
  names = sorted(os.path.join("clips", name) for name in os.listdir(audio_dir / "clips"))
  embeddings = model.embed_audio([str(audio_dir / name) for name in names])
  index = str(root / "index")
  source = {"audio_dir": str(audio_dir), **model.identity.record()}
  api.write_index(index, np.concatenate([embeddings, -embeddings[:1]]), names + ["link.wav"], source)
  captions = retrieve.read_captions(os.path.join(config.data.raw_dir, f"clotho_captions_{config.data.test_split}.csv"))
  server = uvicorn.Server(uvicorn.Config(serve.create_app(model, index, captions), log_level="warning"))
  listening = socket.create_server(("127.0.0.1", 0))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
  thread.start()
  while not server.started and thread.is_alive():
    time.sleep(0.05)
  assert server.started
  yield f"http://127.0.0.1:{listening.getsockname()[1]}/", model, index, str(audio_dir), captions
  server.should_exit = True
  thread.join()


def _read_png(data: bytes) -> np.ndarray:
  """[height, width, 3] uint8 of an 8-bit RGB PNG without filters (what `serve.png` writes), checking its CRCs."""
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  position, chunks = 8, {}
  while position < len(data):
    (length,), kind = struct.unpack(">I", data[position : position + 4]), data[position + 4 : position + 8]
    body = data[position + 8 : position + 8 + length]
    assert struct.unpack(">I", data[position + 8 + length : position + 12 + length])[0] == zlib.crc32(kind + body)
    chunks[kind] = chunks.get(kind, b"") + body
    position += 12 + length
  width, height, depth, colour, _, _, _ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
  assert (depth, colour) == (8, 2) and b"IEND" in chunks
  rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, 1 + 3 * width)
  assert not rows[:, 0].any()  # Filter type 0 on every row.
  return rows[:, 1:].reshape(height, width, 3)


def test_png_and_spectrogram_image():
  rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  np.testing.assert_array_equal(_read_png(serve.png(rgb)), rgb)
  log_mel = np.full((500, 64), -100.0)
  log_mel[250:, 40] = -10.0  # A loud band in the second half, at a high mel bin (drawn near the top).
  image = serve.spectrogram_image(log_mel)
  assert image.shape == (64, serve.SPECTROGRAM_WIDTH, 3) and image.dtype == np.uint8
  brightness = image.astype(int).sum(axis=2)
  assert brightness[63 - 40, -1] == 252 + 253 + 191 and brightness[63 - 40, 0] == 4 and brightness[0, -1] == 4


def test_search_ranks_as_the_api(site):
  url, model, index, _, _ = site
  page = requests.get(url, timeout=30)
  assert page.status_code == 200 and 'id="query"' in page.text and "audio to captions" in page.text
  found = requests.get(url + "api/search", params={"q": QUERY, "k": 3}, timeout=60).json()["results"]
  expected = model.search(QUERY, index, top_k=3)
  assert [r["name"] for r in found] == [name for name, _ in expected]
  np.testing.assert_allclose([r["score"] for r in found], [score for _, score in expected], atol=1e-6)
  assert found[0]["audio"] == f"audio/{expected[0][0]}" and found[0]["spectrogram"] == f"spectrogram/{expected[0][0]}"


def test_audio_and_spectrograms_are_served(site):
  url, _, index, audio_dir, _ = site
  name = api.read_index(index)[1][0]
  audio = requests.get(url + f"audio/{name}", timeout=30)
  assert audio.status_code == 200 and audio.headers["content-type"] in ("audio/x-wav", "audio/wav")
  with open(os.path.join(audio_dir, name), "rb") as f:
    assert audio.content == f.read()
  spectrogram = requests.get(url + f"spectrogram/{name}", timeout=30)
  assert spectrogram.status_code == 200 and spectrogram.headers["content-type"] == "image/png"
  columns = min(serve.SPECTROGRAM_WIDTH, features.num_frames(sf.info(os.path.join(audio_dir, name)).frames))
  assert _read_png(spectrogram.content).shape == (64, columns, 3) and columns > 100


@pytest.mark.parametrize("prefix", ["audio", "spectrogram"])
def test_paths_out_of_the_indexed_folder_are_refused(site, prefix):
  url, _, _, audio_dir, _ = site
  host, port = url.split("//")[1].rstrip("/").split(":")
  outside = os.path.join(os.path.dirname(audio_dir), "secret.txt")
  paths = {
    f"/{prefix}/../secret.txt": (404,),
    f"/{prefix}/clips/../../secret.txt": (404,),
    f"/{prefix}/%2e%2e/secret.txt": (404,),
    f"/{prefix}/%2e%2e%2fsecret.txt": (404,),
    f"/{prefix}/{outside}": (404,),  # An absolute path: //tmp/...
    f"/{prefix}/%2F{outside.lstrip('/').replace('/', '%2F')}": (404,),
    f"/{prefix}/notes.txt": (404,),  # In the folder, but not a clip of the index.
    f"/{prefix}/link.wav": (403,),  # Listed, but a link out of the folder.
  }
  for path, statuses in paths.items():
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", path)  # Sent as written: no client-side normalisation of "..".
    response = connection.getresponse()
    body = response.read()
    connection.close()
    assert response.status in statuses and SECRET not in body, (path, response.status, body[:200])


def test_audio_to_captions(site):
  url, model, index, audio_dir, captions = site
  embeddings, names = api.read_index(index)
  caption_embeddings = model.embed_text(captions)
  expected = np.argsort(-(caption_embeddings.astype(np.float64) @ embeddings[1].astype(np.float64)))[:5]
  found = requests.post(url + "api/captions", data={"clip": names[1], "k": 5}, timeout=60).json()["results"]
  assert [r["caption"] for r in found] == [captions[i] for i in expected]
  np.testing.assert_allclose([r["score"] for r in found], caption_embeddings[expected] @ embeddings[1], atol=1e-6)

  typed = "a sound nobody described"
  with open(os.path.join(audio_dir, names[1]), "rb") as f:  # The same clip uploaded, and one caption typed in.
    upload = requests.post(
      url + "api/captions", data={"k": len(captions) + 1, "extra": f"\n{typed}\n"}, files={"file": f}, timeout=60
    ).json()["results"]
  scores = dict((r["caption"], r["score"]) for r in upload)
  assert len(upload) == len(captions) + 1
  assert scores[typed] == pytest.approx(float(model.embed_text([typed])[0] @ embeddings[1]), abs=1e-5)
  assert [r["caption"] for r in upload if r["caption"] != typed][:5] == [captions[i] for i in expected]

  broken = requests.post(url + "api/captions", files={"file": ("x.wav", b"RIFF not audio")}, timeout=60)
  assert broken.status_code == 400 and "x.wav cannot be read as audio" in broken.json()["detail"]
  assert requests.post(url + "api/captions", data={"clip": "nowhere.wav"}, timeout=60).status_code == 404


def _chromium_or_skip():
  """A headless chromium driven by selenium; skips naming what is missing."""
  missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
  try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
  except ImportError:
    missing.append("selenium (pip install -r requirements-test.txt)")
  if missing:
    pytest.skip(f"the browser test needs {', '.join(missing)} (scripts/setup.sh --test installs them with apt-get)")
  options = webdriver.ChromeOptions()
  options.binary_location = shutil.which("chromium")
  for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
    options.add_argument(argument)
  options.add_argument("--autoplay-policy=no-user-gesture-required")
  return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


@pytest.mark.slow
def test_the_page_in_headless_chromium(site, tmp_path):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.common.keys import Keys
  from selenium.webdriver.support.ui import WebDriverWait

  url, model, index, audio_dir, _ = site
  best = model.search(QUERY, index, top_k=1)[0][0]
  browser = _chromium_or_skip()
  try:
    browser.get(url)
    box = browser.find_element(By.ID, "query")
    box.send_keys(QUERY, Keys.ENTER)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "li.result")) == 9)
    first = browser.find_element(By.CSS_SELECTOR, "li.result")
    assert first.find_element(By.CLASS_NAME, "name").text == best
    # The player has loaded the clip's header (HAVE_METADATA) and knows its length; the spectrogram is drawn.
    wait.until(lambda b: b.execute_script("return document.querySelector('li.result audio').readyState") >= 1)
    duration = browser.execute_script("return document.querySelector('li.result audio').duration")
    assert duration == pytest.approx(sf.info(os.path.join(audio_dir, best)).duration, abs=1e-3)
    assert browser.execute_script("return document.querySelector('li.result img').naturalHeight") == 64
    browser.save_screenshot(str(tmp_path / "search_page.png"))
  finally:
    browser.quit()


@pytest.mark.slow
def test_the_command_line(site, tiny_trained, tmp_path):
  _, _, index, _, _ = site
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  command = [sys.executable, "-m", "atr_jax.serve", f"--workdir={tiny_trained[1]}", "--port=0"]
  bad = subprocess.run(command + [f"--index={tmp_path}"], capture_output=True, text=True, cwd=REPO, env=env)
  assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
    f"error: {tmp_path} is not an index (needs embeddings.npy and files.json); make one with "
    "`python -m atr_jax.retrieve index`"
  ]
  server = subprocess.Popen(command + [f"--index={index}"], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
  try:
    line = server.stdout.readline()
    assert line.startswith(f"Serving {index} at http://127.0.0.1:"), line
    found = requests.get(line.split(" at ")[1].split()[0] + "api/search", params={"q": QUERY}, timeout=120)
    assert found.status_code == 200 and len(found.json()["results"]) == 9
  finally:
    server.terminate()
    server.wait(timeout=60)
