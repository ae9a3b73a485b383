"""Where a text tower's files live: a local Hugging Face-format folder (config.json, weights, tokenizer files), or
a hub name (`bert-base-uncased`, `prajjwal1/bert-mini`, ...) fetched into the HF cache where the network allows."""

import os

_FILES = [
  "config.json",
  "model.safetensors",
  "pytorch_model.bin",
  "tokenizer.json",
  "tokenizer_config.json",
  "vocab.txt",
  "merges.txt",
  "vocab.json",
  "special_tokens_map.json",
]


def resolve_model_dir(name_or_dir: str) -> str:
  """The local folder of `name_or_dir`: itself when it is a folder, else the hub snapshot of that name."""
  path = os.path.expanduser(name_or_dir)
  if os.path.isdir(path):
    return path
  if os.path.isabs(path) or name_or_dir.startswith(("~", ".")) or name_or_dir.count("/") > 1:
    raise FileNotFoundError(f"config.model.text.model_dir={name_or_dir!r}: the text model folder {path} does not exist")
  from huggingface_hub import snapshot_download

  try:
    return snapshot_download(repo_id=name_or_dir, allow_patterns=_FILES)
  except Exception as e:  # Offline, unknown repo, gated model: all end here.
    raise FileNotFoundError(
      f"config.model.text.model_dir={name_or_dir!r} is neither a local folder nor a Hugging Face hub model that "
      f"could be downloaded here ({type(e).__name__}: {e}); download it elsewhere and pass its folder"
    ) from e
