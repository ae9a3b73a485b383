"""The towers a dual encoder is built from, by name: `AUDIO_TOWERS` (chosen by `model.audio.arch`: PANNs' "cnn14"
and "resnet38" on stored log-mels, "passt" on waveforms), `TEXT_TOWERS` (`model.text.arch`: "bert" for BERT and
RoBERTa folders with HF's pooler; "roberta", the DCASE 2025 baseline's RoBERTa without a pooling layer), the contract
every entry fulfils (`Tower`), and `audio_inputs`, the audio tower's two inputs taken from a batch.

Adding a tower: one module (the Flax module, `fields_from_config`, `load`), one entry here, one config naming it.
"""

from collections.abc import Callable
import dataclasses

import jax.numpy as jnp
import flax.linen as nn
import ml_collections

from atr_jax.models import bert, cnn14, panns, passt, resnet38
from data_pipelines import audio_forms

# The audio inputs a tower takes are the batch keys of a prepared dataset's audio feature (config.data.audio_feature,
# data_pipelines.audio_forms) and of its mask.
LOG_MEL_INPUTS = ("log_mel", "frame_mask")  # (B, T, 64) float, (B, T) bool
WAVEFORM_INPUTS = ("waveform", "sample_mask")  # (B, L) float in [-1, 1] at 32 kHz, (B, L) bool
TEXT_INPUTS = ("input_ids", "attention_mask")  # (B, L) int, (B, L)


@dataclasses.dataclass(frozen=True)
class Tower:
  """One tower.

  module: a Flax module class with a `dtype` (compute dtype) field, called as (*inputs, train), all positional: an
    audio tower returns the clip embedding (B, D), a text tower (last_hidden_state (B, L, H), pooled_output (B, H)).
  fields: its `model.audio` / `model.text` ConfigDict -> the module's other fields.
  inputs: the batch features it is called with, in order (what the data layer must hand over).
  load: (released weights: a file, folder or hub name; the tower's variables, arrays or ShapeDtypeStructs) -> those
    variables ({'params', ...} of numpy float32) mapped from the released weights; a ValueError names every
    missing, unexpected or misshaped key.
  max_frames: audio towers: the longest input (frames) embedded whole; None = any length.
  """

  module: type[nn.Module]
  fields: Callable[[ml_collections.ConfigDict], dict]
  inputs: tuple[str, ...]
  load: Callable[[str, dict], dict]
  max_frames: int | None = None

  def build(self, config: ml_collections.ConfigDict, dtype=jnp.float32, remat: bool = False) -> nn.Module:
    """The tower of `config` computing in `dtype`, rematerialised (activations recomputed in the backward pass)
    when `remat`: block by block where the module has a `remat` field (the transformers), else as a whole."""
    if "remat" in self.module.__dataclass_fields__:
      return self.module(**self.fields(config), dtype=dtype, remat=remat)
    # `train` (after the inputs; flax counts self as argument 0) is static.
    module = nn.remat(self.module, static_argnums=(len(self.inputs) + 1,)) if remat else self.module
    return module(**self.fields(config), dtype=dtype)


AUDIO_TOWERS = {
  "cnn14": Tower(cnn14.Cnn14, cnn14.fields_from_config, LOG_MEL_INPUTS, panns.load),
  "resnet38": Tower(resnet38.ResNet38, resnet38.fields_from_config, LOG_MEL_INPUTS, panns.load),
  "passt": Tower(passt.Passt, passt.fields_from_config, WAVEFORM_INPUTS, passt.load),
}
TEXT_TOWERS = {
  "bert": Tower(bert.BertEncoder, bert.fields_from_config, TEXT_INPUTS, bert.load),
  "roberta": Tower(bert.BertEncoder, bert.roberta_fields_from_config, TEXT_INPUTS, bert.load),
}


def audio_inputs(batch: dict) -> tuple:
  """The audio tower's (input, mask) in `batch`: its (log_mel, frame_mask) or its (waveform, sample_mask)."""
  for names in (LOG_MEL_INPUTS, WAVEFORM_INPUTS):
    if names[0] in batch:
      return batch[names[0]], batch[names[1]]
  raise KeyError(f"the batch holds no audio input ({LOG_MEL_INPUTS[0]} or {WAVEFORM_INPUTS[0]}): {sorted(batch)}")


def example_audio(tower: Tower, batch: int = 1, frames: int = 64) -> tuple:
  """Zero inputs of `frames` 10 ms frames for the audio `tower` (for initialisation and shape evaluation)."""
  if tower.inputs == WAVEFORM_INPUTS:
    samples = frames * audio_forms.WAVEFORM.rows_per_frame
    return jnp.zeros((batch, samples)), jnp.ones((batch, samples), bool)
  return jnp.zeros((batch, frames, 64)), jnp.ones((batch, frames), bool)


def _lookup(towers: dict[str, Tower], arch: str, key: str) -> Tower:
  if arch not in towers:
    raise ValueError(f"{key} {arch!r} is not one of {tuple(towers)}")
  return towers[arch]


def audio_tower(audio_config: ml_collections.ConfigDict) -> Tower:
  """The entry of `model.audio.arch`."""
  return _lookup(AUDIO_TOWERS, audio_config.arch, "model.audio.arch")


def text_tower(text_config: ml_collections.ConfigDict) -> Tower:
  """The entry of `model.text.arch`."""
  return _lookup(TEXT_TOWERS, text_config.arch, "model.text.arch")
