"""Text-model folders as the hub serves them (issue 27 item 1), built here to the hub's file lists, nothing
downloaded: the caption tokenizer gives transformers' AutoTokenizer ids and attention masks (padding="max_length",
truncation) where the folder names no padding token.

- WordPiece (MiniLM's vocabulary) with bert-base-uncased's files: config.json, model.safetensors, tokenizer.json
  (no padding or truncation block), vocab.txt, and a tokenizer_config.json holding only do_lower_case and
  model_max_length, no special_tokens_map.json; bert-base-cased's (do_lower_case false); and none at all (as
  dmis-lab/biobert-base-cased-v1.1: transformers then lower-cases, its class default, whatever tokenizer.json says).
- Byte-level BPE trained here with the `tokenizers` library, with roberta-large's files: config.json (pad_token_id 1,
  bos_token_id 0, eos_token_id 2), tokenizer.json, vocab.json, merges.txt, no tokenizer_config.json.
"""

import json
import os
import shutil

import numpy as np
import pytest

from atr_jax import tokenization
from atr_jax.models.bert import minilm_dir

MAX_LEN = 20
WORDS = (
  "a dog barks loudly while cars pass by in the rain birds chirp water flows from tap engine hums children play "
  "outside door creaks slowly wind howls through trees café naïve façade über Zürich high-pitched dog's it's "
  "don't 3 12 people talking crowd cheers footsteps on gravel metal clanks"
).split()
MARKS = (",", ".", "!", "?", ";", ":", '"', "'", "-", "(", ")", "“", "”", "—", "...")
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # roberta-large's ids 0, 1, 2, 3 (and its <mask>).


def _random_captions(rng: np.random.Generator, count: int) -> list[str]:
  """Captions of 1 to 40 words (many past MAX_LEN tokens), with random capitals, punctuation and spacing."""
  texts = []
  for _ in range(count):
    words = []
    for word in rng.choice(WORDS, size=int(rng.integers(1, 41))):
      word = word.upper() if rng.random() < 0.1 else word.capitalize() if rng.random() < 0.2 else word
      if rng.random() < 0.3:
        word += str(rng.choice(MARKS))
      words.append(word)
    texts.append((" " if rng.random() < 0.8 else "  ").join(words))
  return texts + ["", "   ", "A", "Dog. " * 30]


def _reference(folder: str, texts: list[str]) -> dict:
  import transformers

  encoded = transformers.AutoTokenizer.from_pretrained(folder)(
    texts, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="np"
  )
  return {key: encoded[key] for key in ("input_ids", "attention_mask")}


def _assert_as_autotokenizer(folder: str, texts: list[str]) -> None:
  tokenizer = tokenization.load_tokenizer(folder, MAX_LEN)
  assert isinstance(tokenizer, tokenization._FastTokenizer)  # The tokenizers-library path, not transformers'.
  ours, expected = tokenizer(texts), _reference(folder, texts)
  assert ours["input_ids"].shape == (len(texts), MAX_LEN)
  for key in ("input_ids", "attention_mask"):
    np.testing.assert_array_equal(ours[key], expected[key], err_msg=key)
  assert ours["attention_mask"].all(axis=1).sum() > 0 and not ours["attention_mask"].all()  # Truncated and padded.


def _wordpiece_folder(path, tokenizer_config: dict | None, lowercase: bool) -> str:
  """A BERT folder with MiniLM's vocabulary, config and weights and a hub-shaped tokenizer.json whose normalizer
  lower-cases or not."""
  source = minilm_dir()
  os.makedirs(path)
  for name in ("config.json", "vocab.txt"):
    shutil.copy(os.path.join(source, name), path)
  os.symlink(os.path.join(source, "model.safetensors"), os.path.join(path, "model.safetensors"))
  with open(os.path.join(source, "tokenizer.json"), encoding="utf-8") as f:
    tokenizer_json = json.load(f)
  tokenizer_json.update(padding=None, truncation=None)  # As bert-base-uncased's tokenizer.json.
  tokenizer_json["normalizer"]["lowercase"] = lowercase
  with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
    json.dump(tokenizer_json, f, ensure_ascii=False)
  if tokenizer_config is not None:
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
      json.dump(tokenizer_config, f)
  return str(path)


def _byte_level_bpe_folder(path, corpus: list[str], hub_post_processor: bool, special_tokens=SPECIAL_TOKENS) -> str:
  """A RoBERTa folder with roberta-large's file list: a byte-level BPE trained on `corpus`. Its tokenizer.json's
  post-processor is roberta-large's (RobertaProcessing) or, when not `hub_post_processor`, the one the tokenizers
  library writes (ByteLevel, which adds no <s> </s>)."""
  import tokenizers

  os.makedirs(path)
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=2, special_tokens=special_tokens, show_progress=False)
  bpe.save_model(str(path))  # vocab.json, merges.txt
  tokenizer_json = json.loads(bpe.to_str())
  if hub_post_processor:
    tokenizer_json["post_processor"] = {
      "type": "RobertaProcessing",
      "sep": ["</s>", 2],
      "cls": ["<s>", 0],
      "trim_offsets": True,
      "add_prefix_space": False,
    }
  with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
    json.dump(tokenizer_json, f, ensure_ascii=False)
  config = {  # roberta-large's config.json, at this vocabulary's size.
    "architectures": ["RobertaForMaskedLM"],
    "attention_probs_dropout_prob": 0.1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 514,
    "model_type": "roberta",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "pad_token_id": 1,
    "type_vocab_size": 1,
    "vocab_size": bpe.get_vocab_size(),
  }
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  return str(path)


@pytest.mark.parametrize(
  "tokenizer_config, lowercase",
  [
    ({"do_lower_case": True, "model_max_length": 512}, True),  # bert-base-uncased
    ({"do_lower_case": False, "model_max_length": 512}, False),  # bert-base-cased
    (None, False),  # No tokenizer_config.json: transformers lower-cases (its default), tokenizer.json does not.
  ],
  ids=["uncased", "cased", "no_tokenizer_config"],
)
def test_wordpiece_folder_as_the_hub_serves_it(tmp_path, tokenizer_config, lowercase):
  folder = _wordpiece_folder(tmp_path / "bert", tokenizer_config, lowercase)
  assert sorted(os.listdir(folder)) == sorted(
    ["config.json", "model.safetensors", "tokenizer.json", "vocab.txt"]
    + ["tokenizer_config.json"] * bool(tokenizer_config)
  )
  _assert_as_autotokenizer(folder, _random_captions(np.random.default_rng(27), 60))


@pytest.mark.parametrize("hub_post_processor", [True, False], ids=["roberta_processing", "tokenizers_default"])
def test_byte_level_bpe_folder_as_the_hub_serves_it(tmp_path, hub_post_processor):
  rng = np.random.default_rng(1)
  folder = _byte_level_bpe_folder(tmp_path / "roberta", _random_captions(rng, 300), hub_post_processor)
  assert sorted(os.listdir(folder)) == ["config.json", "merges.txt", "tokenizer.json", "vocab.json"]
  _assert_as_autotokenizer(folder, _random_captions(rng, 60))


def test_a_padding_token_missing_from_the_vocabulary_names_the_file(tmp_path):
  corpus = _random_captions(np.random.default_rng(2), 100)
  folder = _byte_level_bpe_folder(tmp_path / "roberta", corpus, True, special_tokens=["<s>", "</s>", "<unk>"])
  with pytest.raises(ValueError, match=r"roberta/tokenizer\.json: the pad_token '<pad>' of this roberta tokenizer"):
    tokenization.load_tokenizer(folder, MAX_LEN)
