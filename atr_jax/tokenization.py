"""The tokenizer of a config's text model and the caption encoder built on it (cleaning + tokenisation live in
`data_pipelines.captions`, which every caption of training, evaluation and retrieval goes through).

A folder with `tokenizer.json` is read by the `tokenizers` library itself (what transformers' fast tokenizers wrap),
which starts in a fraction of the time of importing transformers (~6 s of every process's start on 2 cores); a
folder with only vocabulary files goes through transformers' AutoTokenizer. Both give the ids AutoTokenizer gives
with padding="max_length" and truncation (tests/test_data_pipeline.py compares them).
"""

import json
import os

import numpy as np

from atr_jax.models.hf_hub import resolve_model_dir
from data_pipelines import captions


def _tokenizer_setting(model_dir: str, key: str):
  """`key` from tokenizer_config.json, else special_tokens_map.json (a token given as {'content': ...} or as text)."""
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    path = os.path.join(model_dir, name)
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        value = json.load(f).get(key)
      if value is not None:
        return value["content"] if isinstance(value, dict) else value
  return None


class _FastTokenizer:
  """texts -> {'input_ids', 'attention_mask'} int32 (n, max_len) from a folder's tokenizer.json."""

  def __init__(self, model_dir: str, max_len: int):
    import tokenizers

    self._tokenizer = tokenizers.Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    pad_token = _tokenizer_setting(model_dir, "pad_token")
    pad_id = None if pad_token is None else self._tokenizer.token_to_id(pad_token)
    if pad_id is None:
      raise ValueError(f"{model_dir}: no padding token in tokenizer_config.json or special_tokens_map.json")
    self._tokenizer.enable_truncation(max_len, direction=_tokenizer_setting(model_dir, "truncation_side") or "right")
    self._tokenizer.enable_padding(
      length=max_len,
      pad_id=pad_id,
      pad_token=pad_token,
      direction=_tokenizer_setting(model_dir, "padding_side") or "right",
    )

  def __call__(self, texts: list[str]) -> dict:
    encoded = self._tokenizer.encode_batch(texts)
    return {
      "input_ids": np.asarray([e.ids for e in encoded], np.int32).reshape(len(texts), -1),
      "attention_mask": np.asarray([e.attention_mask for e in encoded], np.int32).reshape(len(texts), -1),
    }


class _TransformersTokenizer:
  """texts -> {'input_ids', 'attention_mask'} int32 (n, max_len) through transformers' AutoTokenizer."""

  def __init__(self, model_dir: str, max_len: int):
    from transformers import AutoTokenizer

    self._tokenizer, self._max_len = AutoTokenizer.from_pretrained(model_dir), max_len

  def __call__(self, texts: list[str]) -> dict:
    encoded = self._tokenizer(
      texts, padding="max_length", truncation=True, max_length=self._max_len, return_tensors="np"
    )
    return {key: encoded[key].astype(np.int32) for key in ("input_ids", "attention_mask")}


def load_tokenizer(model_dir: str, max_len: int):
  """The tokenizer of a text model (a local folder with tokenizer.json or vocabulary files, or a hub name) as a
  callable: texts -> {'input_ids', 'attention_mask'} int32 arrays (len(texts), max_len)."""
  model_dir = resolve_model_dir(model_dir)
  if os.path.exists(os.path.join(model_dir, "tokenizer.json")):
    return _FastTokenizer(model_dir, max_len)
  return _TransformersTokenizer(model_dir, max_len)


def caption_encoder(config) -> captions.CaptionEncoder:
  """The caption encoder of a config: `config.data.caption_cleaning` then the tokenizer of `config.model.text`
  (model_dir, max_len)."""
  return captions.CaptionEncoder(
    load_tokenizer(config.model.text.model_dir, config.model.text.max_len), config.data.caption_cleaning
  )
