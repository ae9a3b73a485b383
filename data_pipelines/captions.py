"""Captions to model inputs, one path for training, evaluation and retrieval: cleaning chosen by
config.data.caption_cleaning (records keep the raw captions), then tokenisation (`CaptionEncoder`).

Cleanings (`CLEANINGS`):
- "reference" (SPEC 7): lower-case, drop the spaces before punctuation, replace , . ! ? ; : " by spaces, then
  collapse runs of spaces and strip;
- "dcase2025" (SPEC 11b, the DCASE 2025 baseline's `caption.lower().translate(str.maketrans('', '',
  string.punctuation))`): lower-case, then delete every ASCII punctuation mark, no space put in its place ("dog's"
  -> "dogs", "high-pitched" -> "highpitched"; spaces and non-ASCII marks such as “ ” — stay);
- "raw": the caption unchanged.
"""

import re
import string

_SPACES_BEFORE_PUNCTUATION = re.compile(r"\s+([,.!?;:\"])")
_PUNCTUATION = re.compile(r"[,.!?;:\"]")
_SPACES = re.compile(r"\s+")
_ASCII_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _reference(text: str) -> str:
  text = _SPACES_BEFORE_PUNCTUATION.sub(r"\1", text.lower())
  return _SPACES.sub(" ", _PUNCTUATION.sub(" ", text)).strip()


def _dcase2025(text: str) -> str:
  return text.lower().translate(_ASCII_PUNCTUATION)


CLEANINGS = {"reference": _reference, "dcase2025": _dcase2025, "raw": lambda text: text}


def as_text(caption) -> str:
  """A caption as text: `str` as it is, `bytes` (what tf.data hands over for string features) decoded as UTF-8.
  Anything else is a TypeError: `str()` of it would be its repr (e.g. "b'...'"), not its text."""
  if isinstance(caption, bytes):
    return caption.decode("utf-8")
  if isinstance(caption, str):
    return caption
  raise TypeError(f"a caption must be str or UTF-8 bytes, not {type(caption).__name__}: {caption!r}")


def clean_caption(text: str, mode: str) -> str:
  """`text` preprocessed as `mode` (a key of `CLEANINGS`); a ValueError naming the config key for another mode."""
  if mode not in CLEANINGS:
    raise ValueError(f"config.data.caption_cleaning={mode!r} is not one of {tuple(CLEANINGS)}")
  return CLEANINGS[mode](text)


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
