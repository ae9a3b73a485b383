"""Process defaults for our entry points on CPU (XLA flags, the C allocator); `set_defaults()` must run before jax
is imported. Both are CPU workarounds, measured on CPU only: they apply only when the run will be on the CPU
(`runs_on_cpu`, decided from the environment and the installed JAX plugins without touching an accelerator); GPU and
TPU runs keep XLA's flags and the default allocator.

- XLA's default CPU convolution path (YNNPACK) makes CNN14 training ~2x slower than PyTorch on CPU (SPEC 10); we
  opt convolutions out of it unless the user already chose a `xla_cpu_experimental_ynn_fusion_type`.
- XLA allocates a step's temporaries afresh on every run; glibc serves buffers of more than 32 MB (and every buffer
  of an XLA worker thread's arena) with mmap and unmaps them when freed, so each step page-faults gigabytes of
  fresh zeroed pages (measured: 0.5 M faults and ~1.3 s of system time per CNN14 step at batch 8 on 2 cores).
  We make glibc serve everything from one heap and never trim it, so later steps reuse mapped pages
  (`ATR_JAX_KEEP_FREED_MEMORY=0` opts out; no effect outside glibc). Trimming is switched off with the threshold -1
  (mallopt(3)): the largest positive threshold (2 GiB) still returned the freed top of the heap after each CNN14 +
  bert-base step at batch 8 (0.55 M page faults and ~2.6 s of system time per step on 2 cores).
"""

import ctypes
import importlib.util
import os
import pkgutil

_CPU_CONVOLUTIONS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
# mallopt parameters of glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_TPU_RUNTIME = "libtpu"  # The TPU runtime package (JAX's other accelerators come as PJRT plugins in `jax_plugins`).


def runs_on_cpu(environ=os.environ) -> bool:
  """Whether JAX will run on the CPU: JAX_PLATFORMS when set (its first platform), else whether no accelerator
  plugin (a `jax_plugins` module, e.g. CUDA or ROCm, or libtpu) is installed. Imports nothing of JAX's."""
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  if importlib.util.find_spec(_TPU_RUNTIME) is not None:
    return False
  plugins = importlib.util.find_spec("jax_plugins")
  return plugins is None or not any(pkgutil.iter_modules(plugins.submodule_search_locations))


def set_defaults() -> None:
  """The CPU defaults (the YNNPACK flag and `keep_freed_memory`) when `runs_on_cpu()`; nothing otherwise."""
  if not runs_on_cpu():
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {_CPU_CONVOLUTIONS}".strip()
  if os.environ.get("ATR_JAX_KEEP_FREED_MEMORY", "1") != "0":
    keep_freed_memory()


def keep_freed_memory() -> bool:
  """Sets glibc malloc to one arena, no mmap and no trimming (threshold -1), before threads start allocating.
  Returns whether the C library took all three settings (False off glibc)."""
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  return all([mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, -1)])
