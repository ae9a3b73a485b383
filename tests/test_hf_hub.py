"""Text model folders: local folders pass through; hub names are fetched, and a failed fetch names the model."""

import huggingface_hub
import pytest

from atr_jax.models import hf_hub
from atr_jax.models.bert import minilm_dir


def test_local_folder_is_used_as_is():
  assert hf_hub.resolve_model_dir(minilm_dir()) == minilm_dir()


def test_hub_name_is_downloaded(monkeypatch):
  calls = []
  monkeypatch.setattr(
    huggingface_hub,
    "snapshot_download",
    lambda repo_id, allow_patterns: calls.append((repo_id, allow_patterns)) or minilm_dir(),
  )
  assert hf_hub.resolve_model_dir("prajjwal1/bert-mini") == minilm_dir()
  assert calls[0][0] == "prajjwal1/bert-mini" and "config.json" in calls[0][1]


def test_failed_download_and_missing_folder_say_which_model(monkeypatch):
  def offline(repo_id, allow_patterns):
    raise OSError("no network")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  with pytest.raises(FileNotFoundError, match="bert-base-uncased.*no network"):
    hf_hub.resolve_model_dir("bert-base-uncased")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf_hub.resolve_model_dir("~/models/not-there")
