"""Caption tokenisation outside the jitted step: HF tokenizers to fixed-length int32 id and mask arrays."""
import numpy as np

from atr_jax.models.hf_hub import resolve_model_dir


def load_tokenizer(model_dir: str):
  """The HF tokenizer of a text model (a local folder with tokenizer.json or vocab.txt, or a hub name)."""
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(resolve_model_dir(model_dir))


def tokenize(tokenizer, captions, max_len: int) -> dict:
  """{'input_ids', 'attention_mask'}: int32 arrays (len(captions), max_len), padded and truncated to max_len."""
  encoded = tokenizer([str(c) for c in captions], padding="max_length", truncation=True, max_length=max_len,
                      return_tensors="np")
  return {"input_ids": encoded["input_ids"].astype(np.int32),
          "attention_mask": encoded["attention_mask"].astype(np.int32)}
