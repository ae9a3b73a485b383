"""Caption text preprocessing chosen by config.data.caption_cleaning (records keep the raw captions; cleaning is
applied when captions are tokenised).

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
