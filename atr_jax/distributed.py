"""Multi-process start-up: `maybe_initialize` calls `jax.distributed.initialize` when the launch asks for it.

It must run before anything touches a device. Modes:
- "auto": initialize when the coordinator flags are given, or when a multi-process launcher is detected: a SLURM
  srun step of more than one task, an Open MPI job of more than one rank, a multi-host Cloud TPU slice
  (TPU_PROCESS_ADDRESSES / TPU_WORKER_HOSTNAMES list several workers) or a multislice TPU job
  (MEGASCALE_NUM_SLICES > 1). JAX fills in what the flags leave out from that environment.
- "on": always initialize (JAX's own detection, e.g. a Cloud TPU VM pod found through the metadata server).
- "off": never (one process, whatever the environment says).
`exit_fast_on_failure` makes a failing process of a multi-process job exit at once, so that launchers notice.
"""

from collections.abc import Iterator, Mapping
import contextlib
import os
import sys

import jax
from absl import logging

MODES = ("auto", "on", "off")


def _int_env(environ: Mapping[str, str], key: str) -> int | None:
  value = environ.get(key, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def _list_env(environ: Mapping[str, str], key: str) -> list[str]:
  return [item for item in environ.get(key, "").split(",") if item.strip()]


def detect_launcher(environ: Mapping[str, str] = os.environ) -> str | None:
  """A description of the multi-process launch that `environ` shows (e.g. "SLURM step of 8 tasks"), or None."""
  slurm_step_tasks = _int_env(environ, "SLURM_STEP_NUM_TASKS")
  if slurm_step_tasks is not None and slurm_step_tasks > 1:
    return f"SLURM step of {slurm_step_tasks} tasks"
  ompi_size = _int_env(environ, "OMPI_COMM_WORLD_SIZE")
  if ompi_size is not None and ompi_size > 1:
    return f"Open MPI job of {ompi_size} ranks"
  tpu_workers = _list_env(environ, "TPU_PROCESS_ADDRESSES") or _list_env(environ, "TPU_WORKER_HOSTNAMES")
  tpu_slices = _int_env(environ, "MEGASCALE_NUM_SLICES") or 1
  if len(tpu_workers) > 1 or tpu_slices > 1:
    return f"Cloud TPU job of {max(len(tpu_workers), 1)} workers x {tpu_slices} slices"
  return None


def _check_flags(mode: str, coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r} is not one of {MODES}")
  given = {
    name: value
    for name, value in (
      ("--coordinator_address", coordinator_address),
      ("--num_processes", num_processes),
      ("--process_id", process_id),
    )
    if value is not None
  }
  if mode == "off" and given:
    raise ValueError(f"--distributed=off contradicts {', '.join(given)}: drop them or use --distributed=auto")
  if coordinator_address is not None:
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
      raise ValueError(f"--coordinator_address={coordinator_address!r} is not HOST:PORT (process 0's address)")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num_processes={num_processes} must be at least 1")
  if process_id is not None and process_id < 0:
    raise ValueError(f"--process_id={process_id} must be non-negative")
  if num_processes is not None and process_id is not None and process_id >= num_processes:
    raise ValueError(f"--process_id={process_id} must be below --num_processes={num_processes}")


def maybe_initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  mode: str = "auto",
  environ: Mapping[str, str] = os.environ,
) -> bool:
  """Initializes jax.distributed if `mode` and the launch ask for it (see the module docstring); returns whether
  this process is now part of a multi-process job. Unset flags (None) are detected from the environment."""
  _check_flags(mode, coordinator_address, num_processes, process_id)
  if jax.distributed.is_initialized():
    logging.info("jax.distributed is already initialized")
    return True
  launcher = detect_launcher(environ) if mode != "off" else None
  explicit = [coordinator_address, num_processes, process_id]
  if mode == "off" or (mode == "auto" and launcher is None and all(v is None for v in explicit)):
    _warn_if_multitask_slurm_allocation(environ)
    logging.info(
      "Single process (--distributed=%s%s): %d local devices: %s",
      mode,
      "" if mode == "off" else ", no multi-process launch detected",
      jax.local_device_count(),
      jax.local_devices(),
    )
    return False
  if mode == "auto" and launcher is None and any(v is None for v in explicit):
    raise ValueError(
      "--coordinator_address, --num_processes and --process_id go together outside a detected "
      "launcher (SLURM, Open MPI, Cloud TPU); missing: "
      + ", ".join(
        n for n, v in zip(("--coordinator_address", "--num_processes", "--process_id"), explicit) if v is None
      )
    )
  if launcher and launcher.startswith("Open MPI") and "OMPI_MCA_orte_hnp_uri" not in environ:
    # Open MPI 5 (PMIx) no longer exports the URI from which JAX derives the coordinator: take the rest from MPI.
    if coordinator_address is None:
      raise ValueError(
        f"{launcher} without OMPI_MCA_orte_hnp_uri (Open MPI >= 5): JAX cannot find the "
        "coordinator; pass --coordinator_address=HOST:PORT of rank 0"
      )
    num_processes = _int_env(environ, "OMPI_COMM_WORLD_SIZE") if num_processes is None else num_processes
    process_id = _int_env(environ, "OMPI_COMM_WORLD_RANK") if process_id is None else process_id
  logging.info(
    "Initializing jax.distributed (--distributed=%s; launch: %s; coordinator %s, %s processes, "
    "process id %s; unset values come from the environment)",
    mode,
    launcher or "explicit flags",
    coordinator_address,
    num_processes,
    process_id,
  )
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  except (ValueError, RuntimeError) as e:
    raise RuntimeError(
      f"jax.distributed.initialize failed (--distributed={mode}, launch: {launcher}): {e}. Pass "
      "--coordinator_address, --num_processes and --process_id, or launch under SLURM (srun), "
      "Open MPI (mpirun) or on a Cloud TPU pod"
    ) from e
  logging.info(
    "jax.distributed: process %d of %d; %d local devices of %d global: %s",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.local_devices(),
  )
  return True


def _warn_if_multitask_slurm_allocation(environ: Mapping[str, str]) -> None:
  tasks = _int_env(environ, "SLURM_NTASKS")
  if tasks is not None and tasks > 1 and "SLURM_STEP_NUM_TASKS" not in environ:
    logging.warning(
      "SLURM_NTASKS=%d but this process is not in an srun step: running as one process; start it "
      "with srun (scripts/slurm_train.sbatch) to use every task",
      tasks,
    )


@contextlib.contextmanager
def exit_fast_on_failure() -> Iterator[None]:
  """In a multi-process job, an exception logs its traceback and ends this process at once (exit code 1).

  Otherwise the failed process would wait in jax.distributed's shutdown barrier for peers that are themselves
  blocked in a collective waiting for it, and the job would hang instead of failing (launchers stop the others
  when one process exits non-zero: scripts/launch_local.py, `srun --kill-on-bad-exit`).
  """
  try:
    yield
  except Exception:
    if not jax.distributed.is_initialized() or jax.process_count() == 1:
      raise
    logging.exception(
      "process %d of %d failed; exiting without waiting for the others", jax.process_index(), jax.process_count()
    )
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
