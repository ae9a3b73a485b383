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
  return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=_REPO, env=env,
                        check=True).stdout.split()


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
      other_flag, "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"]
