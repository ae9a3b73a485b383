"""scripts/benchmark_multiprocess.py's table and argument passing (the timing itself is run by hand, not tested)."""

import ml_collections

from scripts import benchmark_multiprocess


def test_worker_arguments_drop_the_drivers_own_flags():
  argv = [
    "--config",
    "configs/demo.py",
    "--layouts",
    "1x4,2x2",
    "--timeout_s=60",
    "--repeats=3",
    "--config.train.global_batch_size=8",
    "--layouts=2x1",
  ]
  assert benchmark_multiprocess._worker_argv(argv) == [
    "--config",
    "configs/demo.py",
    "--repeats=3",
    "--config.train.global_batch_size=8",
  ]


def test_table_compares_each_layout_with_one_process_on_as_many_devices():
  config = ml_collections.ConfigDict({"train": {"global_batch_size": 32}})
  results = [
    {"processes": 1, "devices": 4, "init_s": 1.0, "compile_s": 2.0, "times": [2.0, 2.0, 9.0]},
    {"processes": 2, "devices": 2, "init_s": 1.0, "compile_s": 2.0, "times": [3.0, 2.9, 3.1]},
    {"processes": 2, "devices": 1, "init_s": 1.0, "compile_s": 2.0, "times": [1.0]},
  ]
  rows = benchmark_multiprocess.format_table(config, results).splitlines()
  assert rows[2].startswith("| 1 x 4 | 32 |") and rows[2].endswith("| 16.0 | 1.00 |")
  assert rows[3].startswith("| 2 x 2 | 32 |") and rows[3].endswith("| 1.50 |")
  assert rows[4].endswith("| - |")  # No 1-process row on 2 devices to compare with.
