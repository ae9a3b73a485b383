"""Command line: turns a raw dataset folder into log-mel TFRecords once and prints what each split holds.

  python -m data_pipelines.prepare --raw_dir RAW [--out_dir OUT] [--dataset clotho]

OUT defaults to `clotho.default_data_dir(RAW)`; running it again on a prepared OUT only prints the counts.
"""
from absl import app, flags

from data_pipelines import clotho, input_pipeline

_RAW_DIR = flags.DEFINE_string("raw_dir", None, "Clotho v2.1-layout folder (captions CSVs and audio folders).",
                               required=True)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the TFRecords go (default: a per-raw_dir folder under "
                               "~/.cache/atr_jax/prepared).")
_DATASET = flags.DEFINE_enum("dataset", "clotho", ["clotho"], "Layout of raw_dir.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out_dir = _OUT_DIR.value or clotho.default_data_dir(_RAW_DIR.value)
  builder = clotho.prepare(_RAW_DIR.value, out_dir)
  print(f"{_DATASET.value} prepared in {builder.data_dir}")
  for split in builder.info.splits:
    clips = builder.info.splits[split].num_examples
    print(f"  {split}: {clips} clips, {input_pipeline.train_pairs_per_epoch(builder, split)} captions")


if __name__ == "__main__":
  app.run(main)
