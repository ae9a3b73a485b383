"""What a prepared record holds per clip: the audio form, `config.data.audio_feature`.

"log_mel": the 64-band log-mel of `features.log_mel`, stored float16 (frames, 64), one row per 10 ms frame (CNN14,
ResNet38). "waveform": the 32 kHz mono samples themselves, clipped to [-1, 1] and stored int16 (samples,) at full
scale 32767, 320 rows per 10 ms frame (PaSST, whose front end runs on the device). Each form names its record
feature and batch key (`name`), the batch key of its validity mask (`mask`), and the `clips.json` key of each clip's
stored length (`length_key`); lengths in 10 ms frames (`frames`) are what training crops and evaluation buckets count.
"""

import dataclasses

import numpy as np

from data_pipelines import features

WAVEFORM_FULL_SCALE = 32767  # int16 value of a sample at 1.0.


@dataclasses.dataclass(frozen=True)
class AudioForm:
  """One form of stored audio; `version` is part of its feature-cache key (`extraction`), `scale` the stored value
  of 1.0 (1: stored values are the float values)."""

  name: str
  mask: str
  rows_per_frame: int
  row_shape: tuple[int, ...]
  stored_dtype: type
  length_key: str
  version: str
  scale: int = 1

  def compute(self, waveform: np.ndarray) -> np.ndarray:
    """The stored array of a float32 mono 32 kHz waveform; a `features.AudioError` (reason too_short) when it is
    shorter than one hop, for either form."""
    if self.name == "log_mel":
      return features.log_mel(waveform).astype(np.float16)
    waveform = features.checked_waveform(waveform)
    return np.round(np.clip(waveform, -1.0, 1.0) * np.float32(self.scale)).astype(np.int16)

  def to_float32(self, stored: np.ndarray) -> np.ndarray:
    """`stored` (a `compute` result) as float32: the log-mel as it is, the int16 samples divided by 32767."""
    stored = np.asarray(stored).astype(np.float32)
    return stored if self.scale == 1 else stored / np.float32(self.scale)

  def frames(self, length: int) -> int:
    """10 ms frames covering `length` stored rows: ceil(length / rows_per_frame)."""
    return -(-int(length) // self.rows_per_frame)


LOG_MEL = AudioForm(
  name="log_mel",
  mask="frame_mask",
  rows_per_frame=1,
  row_shape=(features.N_MELS,),
  stored_dtype=np.float16,
  length_key="num_frames",
  version=features.FEATURE_VERSION,
)
WAVEFORM = AudioForm(
  name="waveform",
  mask="sample_mask",
  rows_per_frame=features.HOP_LENGTH,
  row_shape=(),
  stored_dtype=np.int16,
  length_key="num_samples",
  version=f"waveform-{features.SAMPLE_RATE}-int16-v1",
  scale=WAVEFORM_FULL_SCALE,
)
AUDIO_FORMS = {form.name: form for form in (LOG_MEL, WAVEFORM)}


def audio_form(name: str, key: str = "config.data.audio_feature") -> AudioForm:
  """The form called `name`; a ValueError naming `key`, the value and the choices when there is none."""
  if name not in AUDIO_FORMS:
    raise ValueError(f"{key}={name!r} is not an audio form (choices: {sorted(AUDIO_FORMS)})")
  return AUDIO_FORMS[name]
