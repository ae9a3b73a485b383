"""Caption tokenisation outside the jitted step: HF tokenizers to fixed-length int32 id and mask arrays."""
import os

import numpy as np


def load_tokenizer(model_dir: str):
  """The HF tokenizer stored in a local model folder (tokenizer.json or vocab.txt)."""
  model_dir = os.path.expanduser(model_dir)
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f"text model folder {model_dir!r} does not exist (config.model.text.model_dir); "
                            "download the HF model there first, see README")
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(model_dir)


def tokenize(tokenizer, captions, max_len: int) -> dict:
  """{'input_ids', 'attention_mask'}: int32 arrays (len(captions), max_len), padded and truncated to max_len."""
  encoded = tokenizer([str(c) for c in captions], padding="max_length", truncation=True, max_length=max_len,
                      return_tensors="np")
  return {"input_ids": encoded["input_ids"].astype(np.int32),
          "attention_mask": encoded["attention_mask"].astype(np.int32)}
