"""XLA defaults for our entry points; `set_defaults()` must run before jax is imported.

XLA's default CPU convolution path (YNNPACK) makes CNN14 training ~2x slower than PyTorch on CPU (SPEC 10); we
opt convolutions out of it unless the user already chose a `xla_cpu_experimental_ynn_fusion_type`.
"""
import os

_CPU_CONVOLUTIONS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def set_defaults() -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {_CPU_CONVOLUTIONS}".strip()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
