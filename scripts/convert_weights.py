"""Converts released audio-tower weights into the Flax variables of our audio tower, saved with orbax; point
`config.model.audio.init_from` at the output. PANNs (`Cnn14_mAP=0.431.pth`, `ResNet38_mAP=0.434.pth`: params and
batch_stats) and PaSST-S (`passt-s-f128-p16-s16-ap.468.pt`: params; the AudioSet heads are left out):

python -m scripts.convert_weights --checkpoint Cnn14_mAP=0.431.pth --arch cnn14 --out ~/models/panns/cnn14
python -m scripts.convert_weights --checkpoint passt-s-f128-p16-s16-ap.468.pt --arch passt --out ~/models/passt_s

The file is read with torch's weights-only unpickler (torch CPU needed here only). The tower is the one of
configs/base.py for `--arch` (an `AUDIO_TOWERS` name; its registry entry's `load` maps the file, naming every
missing, unexpected or misshaped key in the file's own names and layout); block-6 pooling does not change CNN14's
parameters, so one conversion serves both. A file that is missing, unreadable or not the `--arch` tower's ends the
command with one line naming the problem and the file, and exit status 1.
"""

import argparse
import os
import sys

import jax

from atr_jax.models import weights
from atr_jax.models.registry import AUDIO_TOWERS, Tower, audio_tower, example_audio
from configs.base import get_base_config


def tower_variables_shape(tower, entry: Tower = AUDIO_TOWERS["cnn14"]) -> dict:
  """The variables ({'params'[, 'batch_stats']}) of the module `tower`, built from the registry `entry`, as
  ShapeDtypeStructs (nothing allocated)."""
  return jax.eval_shape(lambda: tower.init(jax.random.key(0), *example_audio(entry), train=False))


def convert(checkpoint: str, tower, out_dir: str, entry: Tower = AUDIO_TOWERS["cnn14"]) -> str:
  """Maps `checkpoint` onto the variables of the module `tower` (built from the registry `entry`) with the entry's
  `load` (a ValueError lists every mismatch), writes them to `out_dir`; returns the absolute output folder."""
  return weights.save_audio_variables(entry.load(checkpoint, tower_variables_shape(tower, entry)), out_dir)


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--checkpoint", required=True, help='PANNs .pth ({"model": state_dict, ...}) or PaSST .pt (a state_dict)'
  )
  parser.add_argument("--arch", required=True, choices=tuple(AUDIO_TOWERS))
  parser.add_argument("--out", required=True, help="output folder (orbax); replaced if present")
  args = parser.parse_args(argv)
  audio_config = get_base_config().model.audio
  audio_config.arch = args.arch
  tower = audio_tower(audio_config)
  try:
    if not os.path.isfile(os.path.expanduser(args.checkpoint)):
      raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file")
    out_dir = convert(os.path.expanduser(args.checkpoint), tower.build(audio_config), args.out, tower)
  except (FileNotFoundError, ValueError, ImportError) as error:  # The user's file or setup: no traceback.
    sys.exit(f"{parser.prog}: error: {' '.join(str(error).split())}")
  print(f"Wrote the {args.arch} audio tower variables to {out_dir}")
  return out_dir


if __name__ == "__main__":
  main()
