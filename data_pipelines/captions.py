"""Captions to model inputs, one path for training, evaluation and retrieval: cleaning chosen by
config.data.caption_cleaning (records keep the raw captions), then tokenisation (`CaptionEncoder`).

- "reference" (SPEC 7): lower-case, drop the spaces before punctuation, replace , . ! ? ; : " by spaces, then
  collapse runs of spaces and strip;
- "raw": the caption unchanged.
"""

import re

MODES = ("reference", "raw")
_SPACES_BEFORE_PUNCTUATION = re.compile(r"\s+([,.!?;:\"])")
_PUNCTUATION = re.compile(r"[,.!?;:\"]")
_SPACES = re.compile(r"\s+")


def as_text(caption) -> str:
  """A caption as text: `str` as it is, `bytes` (what tf.data hands over for string features) decoded as UTF-8.
  Anything else is a TypeError: `str()` of it would be its repr (e.g. "b'...'"), not its text."""
  if isinstance(caption, bytes):
    return caption.decode("utf-8")
  if isinstance(caption, str):
    return caption
  raise TypeError(f"a caption must be str or UTF-8 bytes, not {type(caption).__name__}: {caption!r}")


def clean_caption(text: str, mode: str) -> str:
  """`text` preprocessed as `mode` ("reference" or "raw"); a ValueError naming the config key for another mode."""
  if mode == "raw":
    return text
  if mode != "reference":
    raise ValueError(f"config.data.caption_cleaning={mode!r} is not one of {MODES}")
  text = _SPACES_BEFORE_PUNCTUATION.sub(r"\1", text.lower())
  return _SPACES.sub(" ", _PUNCTUATION.sub(" ", text)).strip()


class CaptionEncoder:
  """Captions (str, or the UTF-8 bytes tf.data hands over) -> model-ready {'input_ids', 'attention_mask'} int32
  arrays (len(captions), max_len): each caption decoded (`as_text`), cleaned as `cleaning`, then tokenised by
  `tokenizer` (a callable: texts -> those arrays, padded and truncated to its max_len; see
  atr_jax.tokenization.load_tokenizer)."""

  def __init__(self, tokenizer, cleaning: str):
    clean_caption("", cleaning)  # Fails early, naming the config key, on an unknown mode.
    self.tokenizer, self.cleaning = tokenizer, cleaning

  def texts(self, captions) -> list[str]:
    """The cleaned text of each caption: what the tokenizer is given."""
    return [clean_caption(as_text(caption), self.cleaning) for caption in captions]

  def __call__(self, captions) -> dict:
    return self.tokenizer(self.texts(captions))
