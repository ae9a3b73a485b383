"""The tokenizer of a config's text model and the caption encoder built on it (cleaning + tokenisation live in
`data_pipelines.captions`, which every caption of training, evaluation and retrieval goes through).

Both give the ids and attention masks of transformers' `AutoTokenizer.from_pretrained(folder)(texts,
padding="max_length", truncation=True, max_length=max_len)` (tests/test_hub_folders.py, tests/test_data_pipeline.py):

- A BERT or RoBERTa folder with `tokenizer.json` (the tokenizer class transformers picks: tokenizer_config.json's
  "tokenizer_class", else config.json's "model_type") is read by the `tokenizers` library itself, which starts in a
  fraction of the time of importing transformers (~6 s of every process's start on 2 cores). Its vocabulary (and
  merges) come from tokenizer.json; the rest is set as transformers' BertTokenizer / RobertaTokenizer set it: the
  special tokens and options of tokenizer_config.json and special_tokens_map.json, each absent one at the class's
  default (`_CLASS_DEFAULTS`). Hub folders rely on those defaults: bert-base-uncased's tokenizer_config.json holds
  only do_lower_case and model_max_length, roberta-large ships no tokenizer_config.json at all.
- Any other folder goes through transformers' AutoTokenizer.
"""

import json
import os

import numpy as np

from atr_jax.models.hf_hub import resolve_model_dir
from data_pipelines import captions

# What transformers' BertTokenizer and RobertaTokenizer use where the folder does not say (their __init__ defaults).
_CLASS_DEFAULTS = {
  "bert": {
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "do_lower_case": True,
    "strip_accents": None,
    "tokenize_chinese_chars": True,
  },
  "roberta": {
    "pad_token": "<pad>",
    "cls_token": "<s>",
    "sep_token": "</s>",
    "add_prefix_space": False,
    "trim_offsets": True,
  },
}
_SIDES = {"padding_side": "right", "truncation_side": "right"}
_CLASS_FAMILIES = {
  "BertTokenizer": "bert",
  "BertTokenizerFast": "bert",
  "RobertaTokenizer": "roberta",
  "RobertaTokenizerFast": "roberta",
}


def _read_json(model_dir: str, name: str) -> dict:
  """The object in the folder's `name`, {} when the folder has no such file; a file that is not a JSON object is a
  ValueError naming it."""
  path = os.path.join(model_dir, name)
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise ValueError(f"{path} is not a readable JSON file ({type(error).__name__}: {error})") from error
  if not isinstance(value, dict):
    raise ValueError(f"{path} holds a {type(value).__name__}, not a JSON object")
  return value


def _settings(model_dir: str) -> dict | None:
  """The tokenizer settings transformers uses for the folder (keys of `_CLASS_DEFAULTS[family]` and `_SIDES`, plus
  'family'), or None when its tokenizer class is not BERT's or RoBERTa's. As transformers: special_tokens_map.json
  overrides tokenizer_config.json unless that holds "added_tokens_decoder" (then it is not read); a token given as
  {"content": ...} is its content."""
  tokenizer_config = _read_json(model_dir, "tokenizer_config.json")
  if "tokenizer_class" in tokenizer_config:
    family = _CLASS_FAMILIES.get(tokenizer_config["tokenizer_class"])
  else:
    family = _read_json(model_dir, "config.json").get("model_type")
  if family not in _CLASS_DEFAULTS:
    return None
  given = dict(tokenizer_config)
  if "added_tokens_decoder" not in tokenizer_config:
    given.update(_read_json(model_dir, "special_tokens_map.json"))
  settings = {"family": family}
  for key, default in {**_CLASS_DEFAULTS[family], **_SIDES}.items():
    value = given.get(key, default)
    settings[key] = value["content"] if isinstance(value, dict) else value
  return settings


class _FastTokenizer:
  """texts -> {'input_ids', 'attention_mask'} int32 (n, max_len) from a BERT or RoBERTa folder's tokenizer.json and
  the `settings` transformers uses for it (`_settings`)."""

  def __init__(self, model_dir: str, max_len: int, settings: dict):
    import tokenizers
    from tokenizers import normalizers, pre_tokenizers, processors

    path = os.path.join(model_dir, "tokenizer.json")
    try:
      self._tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as error:  # tokenizers raises a bare Exception for a damaged or foreign file.
      raise ValueError(f"{path} is not a readable tokenizer file ({error})") from error
    ids = {}
    for key in ("pad_token", "cls_token", "sep_token"):
      ids[key] = self._tokenizer.token_to_id(settings[key])
      if ids[key] is None:
        raise ValueError(
          f"{path}: the {key} {settings[key]!r} of this {settings['family']} tokenizer is not in its vocabulary "
          "(set it in the folder's tokenizer_config.json)"
        )
    cls_token, sep_token = (settings["cls_token"], ids["cls_token"]), (settings["sep_token"], ids["sep_token"])
    if settings["family"] == "bert":
      self._tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=settings["tokenize_chinese_chars"],
        strip_accents=settings["strip_accents"],
        lowercase=settings["do_lower_case"],
      )
      self._tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
      self._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls_token[0]}:0 $A:0 {sep_token[0]}:0",
        pair=f"{cls_token[0]}:0 $A:0 {sep_token[0]}:0 $B:1 {sep_token[0]}:1",
        special_tokens=[cls_token, sep_token],
      )
    else:
      self._tokenizer.normalizer = None
      self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=settings["add_prefix_space"])
      self._tokenizer.post_processor = processors.RobertaProcessing(
        sep_token, cls_token, settings["trim_offsets"], settings["add_prefix_space"]
      )
    self._tokenizer.enable_truncation(max_len, direction=settings["truncation_side"])
    self._tokenizer.enable_padding(
      length=max_len, pad_id=ids["pad_token"], pad_token=settings["pad_token"], direction=settings["padding_side"]
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

    try:
      self._tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as error:  # transformers' errors rarely name the folder.
      raise ValueError(f"{model_dir}: transformers' AutoTokenizer cannot load this folder ({error})") from error
    self._max_len = max_len

  def __call__(self, texts: list[str]) -> dict:
    encoded = self._tokenizer(
      texts, padding="max_length", truncation=True, max_length=self._max_len, return_tensors="np"
    )
    return {key: encoded[key].astype(np.int32) for key in ("input_ids", "attention_mask")}


def load_tokenizer(model_dir: str, max_len: int):
  """The tokenizer of a text model (a local folder, or a hub name) as a callable: texts -> {'input_ids',
  'attention_mask'} int32 arrays (len(texts), max_len). A folder whose tokenizer cannot be loaded is a ValueError
  naming the file."""
  model_dir = resolve_model_dir(model_dir)
  settings = _settings(model_dir)
  if settings is not None and os.path.exists(os.path.join(model_dir, "tokenizer.json")):
    return _FastTokenizer(model_dir, max_len, settings)
  return _TransformersTokenizer(model_dir, max_len)


def caption_encoder(config) -> captions.CaptionEncoder:
  """The caption encoder of a config: `config.data.caption_cleaning` then the tokenizer of `config.model.text`
  (model_dir, max_len)."""
  return captions.CaptionEncoder(
    load_tokenizer(config.model.text.model_dir, config.model.text.max_len), config.data.caption_cleaning
  )
