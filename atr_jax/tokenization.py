"""Caption tokenisation outside the jitted step: caption cleaning (config.data.caption_cleaning) then HF tokenizers
to fixed-length int32 id and mask arrays."""

import numpy as np

from atr_jax.models.hf_hub import resolve_model_dir
from data_pipelines import captions as caption_text


def load_tokenizer(model_dir: str):
  """The HF tokenizer of a text model (a local folder with tokenizer.json or vocab.txt, or a hub name)."""
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(resolve_model_dir(model_dir))


class CaptionTokenizer:
  """Captions -> {'input_ids', 'attention_mask'}: int32 arrays (len(captions), max_len), each caption cleaned by
  `cleaning` ("reference" or "raw", see data_pipelines.captions) then padded and truncated to max_len."""

  def __init__(self, tokenizer, max_len: int, cleaning: str = "raw"):
    caption_text.clean_caption("", cleaning)  # Fails early, naming the config key, on an unknown mode.
    self.tokenizer, self.max_len, self.cleaning = tokenizer, max_len, cleaning

  @classmethod
  def from_config(cls, config) -> "CaptionTokenizer":
    """The tokenizer of `config.model.text` with `config.data.caption_cleaning`."""
    return cls(
      load_tokenizer(config.model.text.model_dir), config.model.text.max_len, config.data.get("caption_cleaning", "raw")
    )

  def __call__(self, captions) -> dict:
    cleaned = [caption_text.clean_caption(caption_text.as_text(c), self.cleaning) for c in captions]
    encoded = self.tokenizer(
      cleaned, padding="max_length", truncation=True, max_length=self.max_len, return_tensors="np"
    )
    return {
      "input_ids": encoded["input_ids"].astype(np.int32),
      "attention_mask": encoded["attention_mask"].astype(np.int32),
    }
