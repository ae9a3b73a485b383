"""Process defaults of atr_jax.xla_flags, each checked in a fresh interpreter (they must act before jax loads)."""

import os
import subprocess
import sys

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates, touches and frees a block larger than 2 GiB (the largest positive trim threshold), then counts the
# page faults of touching a block of the same size again: with the heap kept, the pages are already mapped.
_REFAULT_SCRIPT = """
import ctypes, resource, sys
from atr_jax import xla_flags
took = xla_flags.keep_freed_memory() if sys.argv[1] == "keep" else True
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
size = 2_400_000_000
def touched_block():
    block = libc.malloc(size)
    assert block, "malloc failed"
    ctypes.memset(block, 1, size)
    return block
libc.free(touched_block())
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
libc.free(touched_block())
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _python(script: str, *args: str, env: dict | None = None) -> list[str]:
  """Runs `script` in a fresh interpreter at the repository root -> its stdout's words."""
  return subprocess.run(
    [sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=_REPO, env=env, check=True
  ).stdout.split()


def _refaults(mode: str) -> tuple[str, int]:
  took, faults = _python(_REFAULT_SCRIPT, mode)
  return took, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_keep_freed_memory_reuses_a_freed_block_over_2_gib_without_page_faults():
  pages = 2_400_000_000 // os.sysconf("SC_PAGE_SIZE")
  took, faults = _refaults("keep")
  assert took == "True"
  assert faults < pages // 100
  _, default_faults = _refaults("default")  # glibc's own settings unmap the block: every page faults again.
  assert default_faults > pages // 2


def test_set_defaults_keeps_the_users_ynn_fusion_choice():
  script = "import os; from atr_jax import xla_flags; xla_flags.set_defaults(); print(os.environ['XLA_FLAGS'])"
  users_choice = "--xla_cpu_experimental_ynn_fusion_type=+individual_dot"
  assert _python(script, env=dict(os.environ, XLA_FLAGS=users_choice)) == [users_choice]
  other_flag = "--xla_force_host_platform_device_count=2"
  assert _python(script, env=dict(os.environ, XLA_FLAGS=other_flag)) == [
    other_flag,
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
  ]


_SET_DEFAULTS_SCRIPT = """
import os
from atr_jax import xla_flags
xla_flags.keep_freed_memory = lambda: print("malloc_set")
xla_flags.set_defaults()
print(xla_flags.runs_on_cpu(), repr(os.environ.get("XLA_FLAGS")))
"""


def _set_defaults_in(env: dict) -> list[str]:
  env = {k: v for k, v in env.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "ATR_JAX_KEEP_FREED_MEMORY")} | env
  return _python(_SET_DEFAULTS_SCRIPT, env={k: v for k, v in env.items() if v is not None})


@pytest.mark.parametrize("platforms", ["cuda", "tpu", "rocm,cpu"])
def test_accelerator_runs_keep_xla_flags_and_malloc(platforms):
  env = dict(os.environ, JAX_PLATFORMS=platforms, XLA_FLAGS="--xla_dump_to=/tmp/x")
  assert _set_defaults_in(env) == ["False", "'--xla_dump_to=/tmp/x'"]


def test_an_installed_accelerator_plugin_means_no_cpu_defaults(tmp_path):
  plugin = tmp_path / "jax_plugins" / "xla_cuda12"
  plugin.mkdir(parents=True)
  (plugin / "__init__.py").write_text("")
  env = dict(os.environ, JAX_PLATFORMS=None, XLA_FLAGS=None, PYTHONPATH=f"{tmp_path}{os.pathsep}{_REPO}")
  assert _set_defaults_in(env) == ["False", "None"]
  env["JAX_PLATFORMS"] = "cpu"  # The user's choice wins over the plugin.
  assert _set_defaults_in(env) == [
    "malloc_set",
    "True",
    "'--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'",
  ]


def test_cpu_runs_get_the_cpu_defaults():
  env = dict(os.environ, JAX_PLATFORMS=None, XLA_FLAGS=None)
  assert _set_defaults_in(env) == [
    "malloc_set",
    "True",
    "'--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'",
  ]


@pytest.mark.parametrize("backend, custom_gradients", [("cpu", True), ("gpu", False), ("tpu", False)])
def test_convolution_gradients_are_chosen_by_backend(monkeypatch, backend, custom_gradients):
  import jax
  import numpy as np
  from atr_jax.models.cnn14 import Conv3x3

  conv = Conv3x3(4)
  x = np.random.default_rng(0).standard_normal((2, 6, 5, 3)).astype(np.float32)
  params = conv.init(jax.random.key(0), x)
  loss = lambda p, x: (conv.apply(p, x) ** 2).sum()  # noqa: E731
  expected = jax.grad(loss)(params, x)  # Traced on this machine's real backend (CPU).
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  jaxpr = str(jax.make_jaxpr(loss)(params, x))
  assert ("custom_vjp_call" in jaxpr) == custom_gradients
  assert "conv_general_dilated" in jaxpr
  got = jax.grad(loss)(params, x)
  np.testing.assert_allclose(got["params"]["kernel"], expected["params"]["kernel"], rtol=1e-5, atol=1e-5)
