"""Starts an N-process JAX job on this machine: `python -m scripts.launch_local --num_processes N
--devices_per_process D -- -m atr_jax.main --config ... --workdir ...`.

Each process runs `python <arguments after -->` plus `--coordinator_address=127.0.0.1:<free port> --num_processes=N
--process_id=K`, with D fake CPU devices (XLA_FLAGS --xla_force_host_platform_device_count=D, the other XLA flags
kept; JAX_PLATFORMS=cpu unless set). Output lines are prefixed with [pK]. If a process fails, the others are
stopped and the launcher exits with its exit code; stopping the launcher (Ctrl-C, SIGTERM) stops them all.

Stalls end with an error after --stall_timeout_s seconds (default: $ATR_JAX_STALL_TIMEOUT_S, else 600; 0: wait
forever): each process gets ATR_JAX_STALL_TIMEOUT_S (atr_jax.watchdog: a training step that does not finish names
its process and step) and, unless XLA_FLAGS already sets it, XLA's --xla_cpu_collective_timeout_seconds (any CPU
collective, e.g. in evaluation or at the data-preparation barrier, fails with gloo's timeout).
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")
_COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_timeout_seconds"
STALL_TIMEOUT_ENV = "ATR_JAX_STALL_TIMEOUT_S"  # Read by atr_jax.watchdog (not imported here: it imports jax).
DEFAULT_STALL_TIMEOUT_S = 600


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(
  num_processes: int, devices_per_process: int, stall_timeout_s: int = DEFAULT_STALL_TIMEOUT_S, environ=os.environ
) -> dict:
  """`environ` with D fake CPU devices per process (other XLA flags kept) and the stall timeouts (module
  docstring); without JAX's persistent compilation cache when there are several processes: only process 0 writes
  it and its keys differ per process, so on a rerun process 0 races ahead and gloo's 30 s setup deadline fails the
  first collective."""
  flags = _DEVICE_COUNT_FLAG.sub("", environ.get("XLA_FLAGS", "")).split()
  flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
  if stall_timeout_s > 0 and not any(flag.startswith(_COLLECTIVE_TIMEOUT_FLAG) for flag in flags):
    flags.append(f"{_COLLECTIVE_TIMEOUT_FLAG}={stall_timeout_s}")
  env = dict(environ)
  env["XLA_FLAGS"] = " ".join(flags)
  env[STALL_TIMEOUT_ENV] = str(stall_timeout_s)
  env.setdefault("JAX_PLATFORMS", "cpu")
  if num_processes > 1 and env.pop("JAX_COMPILATION_CACHE_DIR", None):
    print("launch_local: JAX_COMPILATION_CACHE_DIR is not passed to the processes (multi-process CPU)", flush=True)
  env["PYTHONUNBUFFERED"] = "1"  # Lines reach the prefixer as they are printed.
  return env


def _relay(process_id: int, stream, lock: threading.Lock) -> None:
  for line in stream:
    with lock:
      sys.stdout.write(f"[p{process_id}] {line}")
      sys.stdout.flush()


def _stop(processes: list[subprocess.Popen]) -> None:
  """Kills the processes still running: SIGKILL, since JAX's preemption notifier catches SIGTERM and the survivors
  of a failed job are blocked in collectives anyway (checkpoints are written atomically)."""
  for process in processes:
    if process.poll() is None:
      process.kill()
    process.wait()


def launch(
  command: list[str], num_processes: int, devices_per_process: int, stall_timeout_s: int = DEFAULT_STALL_TIMEOUT_S
) -> int:
  """Runs `python command...` as `num_processes` coordinated processes; returns 0 or the first failure's code."""
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(f"--num_processes={num_processes} and --devices_per_process={devices_per_process} must be >= 1")
  if stall_timeout_s < 0:
    raise ValueError(f"--stall_timeout_s={stall_timeout_s} must be >= 0 (0: no timeout)")
  if not command:
    raise ValueError("nothing to run: give the Python arguments after --, e.g. -- -m atr_jax.main --config ...")
  coordinator = f"127.0.0.1:{free_port()}"
  env = process_env(num_processes, devices_per_process, stall_timeout_s)
  lock = threading.Lock()
  processes, relays = [], []
  for process_id in range(num_processes):
    argv = [
      sys.executable,
      *command,
      f"--coordinator_address={coordinator}",
      f"--num_processes={num_processes}",
      f"--process_id={process_id}",
    ]
    process = subprocess.Popen(
      argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    relay = threading.Thread(target=_relay, args=(process_id, process.stdout, lock), daemon=True)
    relay.start()
    processes.append(process)
    relays.append(relay)
  print(
    f"[launch_local] {num_processes} processes x {devices_per_process} CPU devices, coordinator {coordinator}: "
    f"{' '.join(command)}",
    flush=True,
  )
  try:
    failed = None
    while failed is None and any(p.poll() is None for p in processes):
      failed = next((k for k, p in enumerate(processes) if p.poll() not in (None, 0)), None)
      time.sleep(0.2)
    failed = next((k for k, p in enumerate(processes) if p.poll() not in (None, 0)), failed)
  finally:
    _stop(processes)  # Only does something after a failure or an interrupt.
    for relay in relays:
      relay.join(timeout=5)
  if failed is None:
    return 0
  code = processes[failed].returncode
  print(
    f"[launch_local] process {failed} exited with code {code}; stopped the other processes", file=sys.stderr, flush=True
  )
  return code if code > 0 else 1


def _exit_on_sigterm(signum, frame):
  raise SystemExit(128 + signum)  # Runs `launch`'s cleanup, which stops the processes.


def main() -> None:
  signal.signal(signal.SIGTERM, _exit_on_sigterm)
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--devices_per_process", type=int, default=1, help="fake CPU devices per process")
  parser.add_argument(
    "--stall_timeout_s",
    type=int,
    default=int(os.environ.get(STALL_TIMEOUT_ENV, DEFAULT_STALL_TIMEOUT_S)),
    help="a training step or CPU collective stalled this long ends its process with an error "
    "naming it (0: wait forever)",
  )
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the arguments of python")
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  try:
    sys.exit(launch(command, args.num_processes, args.devices_per_process, args.stall_timeout_s))
  except ValueError as e:
    parser.error(str(e))


if __name__ == "__main__":
  main()
