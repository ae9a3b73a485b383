"""What a run shows a person: one line per phase and a training progress line or bar, from process 0; this
project's warnings and every error, from every process. Everything logged (library details included) goes to the
workdir's log file, and also to the console with --verbosity=1. TensorFlow's C++ start-up and notice lines (oneDNN,
CPU features, "DT_HALF only on AVX-512") are kept off the console unless --verbosity=1 (`quiet_tensorflow`)."""

import logging as python_logging
import os
import sys
import tempfile
import time

import jax
import tensorflow_datasets as tfds
import tqdm
from absl import flags, logging

LOG_NAME = "atr_jax"  # The workdir's log files: atr_jax.INFO (a link to the newest), one file per process and run.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN_CODE = tuple(
  os.path.join(_REPO, folder) + os.sep for folder in ("atr_jax", "data_pipelines", "scripts", "configs")
)


# TF_CPP_MIN_LOG_LEVEL of a quiet console: TensorFlow's C++ INFO, WARNING and ERROR lines (oneDNN's "supports DT_HALF
# only on platforms with AVX-512" is an ERROR line; the kernels stay the same); failures still raise in Python.
QUIET_TF_LOG_LEVEL = "3"
# What TensorFlow writes while it loads, before its log level applies (so TF_CPP_MIN_LOG_LEVEL cannot hide it).
_TF_LOADING_LINES = ("All log messages before absl::InitializeLog() is called", "oneDNN custom operations are on")


def verbosity(argv: list) -> int:
  """The --verbosity (-v) of a command line (absl's spellings: --verbosity=N, --verbosity N, -v N); 0 when absent."""
  found = 0
  for position, arg in enumerate(argv):
    name, equals, value = arg.partition("=")
    if name in ("--verbosity", "-v", "--v"):
      value = value if equals else (argv[position + 1] if position + 1 < len(argv) else "")
      found = int(value) if value.lstrip("-").isdigit() else found
  return found


def quiet_tensorflow(argv: list) -> None:
  """Keeps TensorFlow's C++ lines off the console unless `argv` asks --verbosity >= 1 or TF_CPP_MIN_LOG_LEVEL is 0:
  TF_CPP_MIN_LOG_LEVEL becomes QUIET_TF_LOG_LEVEL when it is unset or 1 (the value JAX gives it when unset; 2 and 3
  stay), and TensorFlow is loaded with the process's stderr held back, all it wrote there passed on but its loading
  notices. Call in an entry point before TensorFlow loads, so before the flags are parsed."""
  level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1")
  if "tensorflow" in sys.modules or verbosity(argv) >= 1 or level == "0":
    return
  if level == "1":
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = QUIET_TF_LOG_LEVEL
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with tempfile.TemporaryFile() as held:
      os.dup2(held.fileno(), 2)
      try:
        import tensorflow  # noqa: F401
      finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        held.seek(0)
        lines = held.read().decode("utf-8", errors="replace").splitlines(keepends=True)
        sys.stderr.write("".join(line for line in lines if not any(text in line for text in _TF_LOADING_LINES)))
        sys.stderr.flush()
  finally:
    os.close(saved)


class _OwnWarnings(python_logging.Filter):
  """Warnings logged by this project's code (not by its libraries'); errors reach the console anyway."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    return record.levelno < python_logging.ERROR and record.pathname.startswith(_OWN_CODE)


def setup(workdir: str, verbosity: int) -> None:
  """Logs to a file in `workdir`; the console gets warnings and errors, or everything when `verbosity` >= 1.
  Call after flag parsing, before anything is logged."""
  workdir = os.path.expanduser(workdir)
  os.makedirs(workdir, exist_ok=True)
  logging.get_absl_handler().use_absl_log_file(LOG_NAME, workdir)
  if verbosity >= 1:
    flags.FLAGS.alsologtostderr = True
  else:
    flags.FLAGS.stderrthreshold = "error"
    own_warnings = python_logging.StreamHandler(sys.stderr)
    own_warnings.setLevel(python_logging.WARNING)
    own_warnings.addFilter(_OwnWarnings())
    own_warnings.setFormatter(python_logging.Formatter("WARNING: %(message)s"))
    python_logging.getLogger().addHandler(own_warnings)
    tfds.disable_progress_bar()  # Its per-split bars; preparation shows its own, per clip.


def phase(message: str, *args) -> None:
  """One line for a person (process 0), also logged."""
  text = message % args if args else message
  logging.info(text)
  if jax.process_index() == 0:
    print(text, file=sys.stderr, flush=True)


class TrainProgress:
  """Training progress from step `start` to `total`: a bar on a terminal, else one line per `update` (logs,
  launchers); rates and ETA leave out the first step after each `restart_clock` (compilation, evaluation)."""

  def __init__(self, total: int, start: int):
    self.total, self.first_step = total, start
    self._clock_step, self._clock = start, time.perf_counter()
    self._bar = None
    if jax.process_index() == 0 and sys.stderr.isatty():
      self._bar = tqdm.tqdm(
        total=total,
        initial=start,
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} {postfix}",
      )

  def restart_clock(self, step: int) -> None:
    self._clock_step, self._clock = step, time.perf_counter()

  def steps_per_sec(self, step: int) -> float:
    elapsed = time.perf_counter() - self._clock
    return (step - self._clock_step) / elapsed if elapsed > 0 and step > self._clock_step else 0.0

  def eta(self, step: int) -> str:
    rate = self.steps_per_sec(step)
    if rate <= 0:
      return "?"
    minutes, seconds = divmod(int((self.total - step) / rate), 60)
    return f"{minutes}m{seconds:02d}s"

  def update(self, step: int, epoch: int, loss: float) -> None:
    """Shows (and logs) the state after `step`: epoch, loss, steps/s and ETA."""
    rate, eta = self.steps_per_sec(step), self.eta(step)
    text = f"step {step}/{self.total} epoch {epoch} loss {loss:.4f}  {rate:.2f} steps/s  ETA {eta}"
    logging.info(text)
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix_str(f"epoch {epoch} loss {loss:.4f} {rate:.2f} steps/s ETA {eta}")
    elif jax.process_index() == 0:
      print(text, file=sys.stderr, flush=True)

  def write(self, text: str) -> None:
    """A phase line that does not break the bar."""
    logging.info(text)
    if self._bar is not None:
      self._bar.write(text, file=sys.stderr)
    elif jax.process_index() == 0:
      print(text, file=sys.stderr, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
