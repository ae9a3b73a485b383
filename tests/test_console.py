"""The console of the project's processes: TensorFlow's C++ start-up lines (oneDNN's notices) are hidden, with
oneDNN's kernels still on, and shown with --verbosity=1 (fresh processes, as a user starts them)."""

import os
import subprocess
import sys
import textwrap

import pytest

from atr_jax import console

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LOADING = "oneDNN custom operations are on"
_DT_HALF = "oneDNN supports DT_HALF only on platforms with AVX-512"
# An entry point's start (as atr_jax.main's), then what training's input pipeline does: float16 records cast.
_ENTRY_POINT = textwrap.dedent(
  """
  import sys
  from atr_jax import xla_flags
  xla_flags.set_defaults()
  from atr_jax import console
  console.quiet_tensorflow(sys.argv)
  import tensorflow as tf
  from tensorflow.python.util import _pywrap_util_port
  print("oneDNN on:", _pywrap_util_port.IsMklEnabled())
  records = tf.data.Dataset.from_tensor_slices(tf.ones([4, 8], tf.float16))
  print("batches:", sum(1 for _ in records.map(lambda x: tf.cast(x, tf.float32) * 2).batch(2)))
  print("our own line", file=sys.stderr)
  """
)


def _run(args: list, check: bool = True, **environ) -> subprocess.CompletedProcess:
  env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **environ)
  return subprocess.run(
    [sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300, check=check
  )


def test_verbosity_is_read_from_the_command_line():
  assert console.verbosity(["prog", "--workdir=x"]) == 0
  assert console.verbosity(["prog", "--verbosity=1"]) == 1
  assert console.verbosity(["prog", "--verbosity", "2", "--workdir", "x"]) == 2
  assert console.verbosity(["prog", "-v", "1"]) == 1
  assert console.verbosity(["prog", "--v=1", "--verbosity=0"]) == 0  # The last one wins, as in absl.


@pytest.mark.slow
def test_tensorflow_start_up_lines_are_hidden_unless_verbose(tmp_path):
  script = tmp_path / "entry_point.py"
  script.write_text(_ENTRY_POINT)
  quiet = _run([str(script), "--workdir=x"])
  assert quiet.stdout.splitlines() == ["oneDNN on: True", "batches: 2"]  # The same kernels.
  assert quiet.stderr.splitlines() == ["our own line"]
  verbose = _run([str(script), "--verbosity=1"])
  assert verbose.stdout == quiet.stdout
  assert _LOADING in verbose.stderr and _DT_HALF in verbose.stderr and "our own line" in verbose.stderr
  assert _LOADING in _run([str(script)], TF_CPP_MIN_LOG_LEVEL="0").stderr  # A level the user set to 0 holds.


@pytest.mark.slow
def test_the_training_command_starts_quietly():
  quiet = _run(["-m", "atr_jax.main", "--help"], check=False)  # absl's --help exits with status 1.
  assert "--workdir" in quiet.stdout and _LOADING not in quiet.stderr and "absl::InitializeLog" not in quiet.stderr
  assert _LOADING in _run(["-m", "atr_jax.main", "--help", "--verbosity=1"], check=False).stderr
