"""Converts a released PANNs checkpoint (`Cnn14_mAP=0.431.pth`, `ResNet38_mAP=0.434.pth`) into the Flax variables
(params + batch_stats) of our audio tower, saved with orbax; point `config.model.audio.init_from` at the output.

python -m scripts.convert_panns --checkpoint Cnn14_mAP=0.431.pth --arch cnn14 --out ~/models/panns/cnn14

The file is read with torch's weights-only unpickler (torch CPU needed here only). The tower is the one of
configs/base.py for `--arch` (an `AUDIO_TOWERS` name; its registry entry's `load` maps the file); block-6 pooling
does not change CNN14's parameters, so one conversion serves both.
"""

import argparse
from collections.abc import Callable

import jax
import jax.numpy as jnp

from atr_jax.models import panns
from atr_jax.models.registry import AUDIO_TOWERS, audio_tower
from configs.base import get_base_config


def tower_variables_shape(tower) -> dict:
  """The tower's {'params', 'batch_stats'} as ShapeDtypeStructs (nothing allocated)."""
  frames = 64
  return jax.eval_shape(
    lambda: tower.init(jax.random.key(0), jnp.zeros((1, frames, 64)), jnp.ones((1, frames), bool), train=False)
  )


def convert(checkpoint: str, tower, out_dir: str, load: Callable[[str, dict], dict] = panns.load) -> str:
  """Maps `checkpoint` onto `tower`'s variables with `load` (the tower's registry entry's; PANNs by default: a
  ValueError lists every mismatch), writes them to `out_dir`; returns the absolute output folder."""
  return panns.save_audio_variables(load(checkpoint, tower_variables_shape(tower)), out_dir)


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", required=True, help='PANNs .pth file ({"model": state_dict, ...})')
  parser.add_argument("--arch", required=True, choices=tuple(AUDIO_TOWERS))
  parser.add_argument("--out", required=True, help="output folder (orbax); replaced if present")
  args = parser.parse_args(argv)
  audio_config = get_base_config().model.audio
  audio_config.arch = args.arch
  tower = audio_tower(audio_config)
  out_dir = convert(args.checkpoint, tower.build(audio_config), args.out, tower.load)
  print(f"Wrote the {args.arch} audio tower variables to {out_dir}")
  return out_dir


if __name__ == "__main__":
  main()
