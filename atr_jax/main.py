"""Command line: `python -m atr_jax.main --config configs/<name>.py --workdir DIR [--mode train|evaluate]
[--config.key=value ...] [--allow_config_change] [--allow_data_change] [--verbosity=1] [--distributed auto|on|off]
[--coordinator_address HOST:PORT --num_processes N --process_id I]`.

The console shows one line per phase and the training progress (`atr_jax.console`); the workdir's atr_jax.INFO log
holds everything, which --verbosity=1 also shows. A run that cannot resume (a refused change, a checkpoint that cannot
be read: `checkpointing.CheckpointError`) prints its error as one line and exits with status 1.

Multi-process runs start the same command in every process (scripts/launch_local.py, scripts/slurm_train.sbatch,
scripts/tpu_pod_train.sh); `atr_jax.distributed` joins them before anything touches a device."""

import sys

from atr_jax import xla_flags

xla_flags.set_defaults()  # Before jax is imported.

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from atr_jax import console  # noqa: E402

console.quiet_tensorflow(sys.argv)  # Before TensorFlow loads (train loads it): its C++ lines show with --verbosity=1.

from atr_jax import checkpointing, distributed, train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard summaries and results.json.")
flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "evaluate"],
  "train: train (resuming from the workdir) then test the best checkpoint; "
  "evaluate: test the workdir's best checkpoint again.",
)
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_bool(
  "allow_config_change",
  False,
  "train: resume a workdir's run even though the config changes its data order or step count "
  "(atr_jax.resume.RESUME_KEYS: seed, datasets and their folders, crop, shuffle, input shards, global batch, epochs).",
)
flags.DEFINE_bool(
  "allow_data_change",
  False,
  "train: resume a workdir's run even though its prepared training data changed since the checkpoint (another "
  "fingerprint of a source: sources prepared again, other clips or captions). The global step is kept; the epoch "
  "and the batch within it are recomputed from the new steps per epoch, and the learning-rate schedule is rebuilt "
  "for it (both logged).",
)
flags.DEFINE_enum(
  "distributed",
  "auto",
  list(distributed.MODES),
  "auto: join a multi-process job (jax.distributed) when the coordinator flags are given or a "
  "SLURM srun step, Open MPI job or multi-host Cloud TPU is detected; on: always (JAX detects the "
  "cluster); off: never.",
)
flags.DEFINE_string(
  "coordinator_address",
  None,
  "HOST:PORT of process 0's coordinator service (every process passes the same); unset: detected.",
)
flags.DEFINE_integer("num_processes", None, "Number of processes of the job; unset: detected.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes); unset: detected.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.setup(FLAGS.workdir, FLAGS.verbosity)
  distributed.maybe_initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, mode=FLAGS.distributed)
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")  # tf.data only; the accelerators belong to JAX.
  logging.info("config:\n%s", FLAGS.config)
  try:
    with distributed.exit_fast_on_failure():
      if FLAGS.mode == "train":
        train.train_and_evaluate(
          FLAGS.config,
          FLAGS.workdir,
          allow_config_change=FLAGS.allow_config_change,
          allow_data_change=FLAGS.allow_data_change,
        )
      else:
        train.evaluate_best(FLAGS.config, FLAGS.workdir)
  except checkpointing.CheckpointError as error:
    logging.info("stopped: %s", error)
    raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
  app.run(main)
