"""Test session setup (before jax is imported): 8 fake CPU devices, and one XLA compilation cache for the session
that the training subprocesses share (a killed run, its restart and the uninterrupted run compile the same
programs once), removed at exit."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="atr_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


import pytest  # noqa: E402


@pytest.hookimpl(tryfirst=True)  # Before xdist's own hook reads the groups (else each worker trains it).
def pytest_collection_modifyitems(items):
  """Under pytest-xdist (scripts/test.sh runs `-n 2 --dist loadgroup`) the tests that share the tiny trained workdir
  go to one worker, which trains it once."""
  for item in items:
    if "tiny_trained" in getattr(item, "fixturenames", ()):
      item.add_marker(pytest.mark.xdist_group("tiny_trained"))


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
  """(config, workdir) of one tiny run trained for 2 epochs, with zero-shot evaluation on a small synthetic
  ESC-50-layout set, shared by the tests that need a trained workdir (treat it as read-only: copy the workdir to
  change it)."""
  from tiny_run import tiny_config

  from atr_jax import train
  from data_pipelines import synthetic

  tmp_path = tmp_path_factory.mktemp("tiny_trained")
  config = tiny_config(tmp_path)
  config.eval.zeroshot.update(dataset="esc50", root=str(tmp_path / "esc50"))
  synthetic.write_esc50(config.eval.zeroshot.root, clips_per_fold=1, duration_s=1.5)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  return config, workdir
