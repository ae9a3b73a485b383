"""Command line: `python -m atr_jax.main --config configs/<name>.py --workdir DIR [--mode train|evaluate]
[--config.key=value ...]`."""
from atr_jax import xla_flags

xla_flags.set_defaults()  # Before jax is imported.

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from atr_jax import train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard summaries and results.json.")
flags.DEFINE_enum("mode", "train", ["train", "evaluate"],
                  "train: train (resuming from the workdir) then test the best checkpoint; "
                  "evaluate: test the workdir's best checkpoint again.")
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")  # tf.data only; the accelerators belong to JAX.
  logging.info("config:\n%s", FLAGS.config)
  if FLAGS.mode == "train":
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    train.evaluate_best(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
