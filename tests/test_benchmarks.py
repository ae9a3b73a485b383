"""Tests of the benchmarks: the PyTorch reference step (scripts/torch_reference.py) and our jitted train step agree
on the same weights and inputs (an honest parity test of both), the reference's PaSST front end and multi-positive
loss agree with ours, and the benchmark scripts run at tiny sizes (CNN14 + BERT, PaSST + RoBERTa)."""

import dataclasses
import functools
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from atr_jax import losses, sharding
from atr_jax.models import panns
from atr_jax.models.bert import ROBERTA_LARGE, load_hf_params
from atr_jax.models.dual_encoder import build_model
from atr_jax.train import train_step
from atr_jax.train_state import create_train_state, make_optimizer
from configs.base import get_base_config
from data_pipelines import passt_features
from scripts import torch_reference

NARROW = (8, 16, 32, 64, 128, 256)
TINY_BERT = dict(
  vocab_size=99,
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=48,
  max_position_embeddings=16,
)
BATCH, FRAMES, TOKENS = 8, 64, 12  # the batch splits over the 8 fake devices of conftest
MATMUL_SIZE = 256  # --matmul_rate's square matmul, small here


def _tiny_config(text_dir: str):
  config = get_base_config()
  config.data.train_max_frames = FRAMES
  config.model.audio.channels, config.model.audio.spec_augment, config.model.audio.dropout = NARROW, False, 0.0
  config.model.audio.init_from = "scratch"
  config.model.text.model_dir, config.model.text.pretrained = text_dir, False
  config.model.text.max_len, config.model.text.dropout = TOKENS, 0.0
  config.model.embed_dim, config.model.head_hidden = 16, 24
  config.loss.name = "ntxent"
  config.optim.learning_rate = 1e-3
  return config


def _tiny_bert_dir(path) -> str:
  import transformers

  transformers.BertConfig(**TINY_BERT).save_pretrained(str(path))
  return str(path)


def _torch_weights_as_ours(model: torch_reference.DualEncoder, text_dir: str, like: dict) -> tuple[dict, dict]:
  """(params, batch_stats) of our DualEncoder holding the torch model's weights."""
  audio_like = {"params": like["params"]["audio"], "batch_stats": like["batch_stats"]["audio"]}
  audio = panns.state_dict_to_variables(
    {k: v.numpy() for k, v in model.audio.state_dict().items()}, audio_like, "torch audio tower"
  )
  model.text.save_pretrained(text_dir)  # safetensors, read back by our HF loader
  _, text = load_hf_params(text_dir)

  def head(module):
    return {
      name: {"kernel": layer.weight.detach().numpy().T, "bias": layer.bias.detach().numpy()}
      for name, layer in (("fc1", module.fc1), ("fc2", module.fc2))
    }

  params = {
    "audio": audio["params"],
    "text": text,
    "audio_head": head(model.audio_head),
    "text_head": head(model.text_head),
  }
  return params, {"audio": audio["batch_stats"]}


@pytest.mark.slow
def test_torch_reference_step_matches_ours_on_the_same_weights(tmp_path):
  config = _tiny_config(_tiny_bert_dir(tmp_path / "bert"))
  torch.manual_seed(0)
  reference = torch_reference.build_from_config(config)
  rng = np.random.default_rng(0)
  batch = {
    "log_mel": rng.normal(-40.0, 12.0, (BATCH, FRAMES, 64)).astype(np.float32),
    "frame_mask": np.ones((BATCH, FRAMES), bool),
    "input_ids": rng.integers(1, TINY_BERT["vocab_size"], (BATCH, TOKENS)).astype(np.int32),
    "attention_mask": (np.arange(TOKENS)[None, :] < rng.integers(3, TOKENS + 1, (BATCH, 1))).astype(np.int32),
    "clip_id": np.array([0, 0, 1, 2, 3, 3, 4, 5], np.int32),
  }

  mesh = sharding.create_mesh()
  model = build_model(config.model)
  tx, _ = make_optimizer(config.optim, steps_per_epoch=100)
  state, shardings = create_train_state(config, model, tx, mesh, jax.random.key(0, impl="rbg"))
  like = {"params": state.params["model"], "batch_stats": state.batch_stats}
  params, batch_stats = _torch_weights_as_ours(reference.model, str(tmp_path / "bert_weights"), like)
  state = state.replace(
    params={**state.params, "model": sharding.place_like(params, state.params["model"])},
    batch_stats=sharding.place_like(batch_stats, state.batch_stats),
  )
  step = jax.jit(
    functools.partial(train_step, loss_fn=losses.make_loss_fn_from_config(config.loss, mesh), rng=jax.random.key(1)),
    in_shardings=(shardings, sharding.batch_sharding(mesh)),
  )

  torch_batch = {k: torch.from_numpy(v) for k, v in batch.items()}
  # The first step checks the forward pass and the gradients tightly. Adam's first update moves every parameter
  # by about the learning rate whatever its gradient's size, so float32 rounding of near-zero gradients shows in
  # the second step's loss at ~4e-5: its tolerance is looser.
  for loss_rtol, norm_rtol in ((2e-5, 2e-5), (2e-4, 2e-4)):
    state, metrics = step(state, sharding.global_batch(batch, mesh))
    torch_loss, torch_norm = reference(
      torch_batch["log_mel"], torch_batch["input_ids"], torch_batch["attention_mask"], torch_batch["clip_id"]
    )
    np.testing.assert_allclose(float(metrics["loss"]), torch_loss, rtol=loss_rtol)
    np.testing.assert_allclose(float(metrics["grad_norm"]), torch_norm, rtol=norm_rtol)
  assert torch_norm > config.optim.grad_clip_norm  # clipping was exercised
  for name, module in (("bn0", reference.model.audio.bn0), ("conv_block6", reference.model.audio.conv_block6.bn2)):
    ours = state.batch_stats["audio"][name]
    ours = ours if name == "bn0" else ours["bn2"]
    np.testing.assert_allclose(np.asarray(ours["mean"]), module.running_mean.numpy(), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name, temperature, seed", [("infonce", 0.1, 3), ("infonce_multi", 0.05, 4)])
def test_torch_reference_same_clip_losses_match_ours(name, temperature, seed):
  """infonce removes same-clip pairs from the denominators; infonce_multi makes them positives."""
  rng = np.random.default_rng(seed)
  audio, text = (torch.nn.functional.normalize(torch.tensor(rng.normal(size=(6, 5))), dim=-1) for _ in range(2))
  clip_ids = np.array([0, 0, 1, 2, 2, 2])
  expected = losses.get_loss(name, temperature=temperature)(audio.numpy(), text.numpy(), clip_ids)
  got = torch_reference.contrastive_loss(audio, text, torch.tensor(clip_ids), name, temperature)
  np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)


@pytest.mark.slow
def test_benchmark_train_prints_both_frameworks_at_tiny_size(tmp_path):
  text_dir = _tiny_bert_dir(tmp_path / "bert")
  command = [
    sys.executable,
    "-m",
    "scripts.benchmark_train",
    "--config",
    "configs/demo.py",
    "--torch",
    "--repeats=2",
    "--warmup=1",
    "--steps_per_round=1",
    f"--config.model.text.model_dir={text_dir}",
    "--config.model.text.pretrained=False",
    f"--config.data.train_max_frames={FRAMES}",
    f"--config.model.text.max_len={TOKENS}",
    f"--config.train.global_batch_size={BATCH}",
  ]
  table = subprocess.run(command, capture_output=True, text=True, check=True).stdout
  rows = [line for line in table.splitlines() if line.startswith("| ours") or line.startswith("| PyTorch")]
  assert len(rows) == 2, table
  ours, pytorch = ([cell.strip() for cell in row.strip("|").split("|")] for row in rows)
  assert ours[3:7] == pytorch[3:7] == [str(BATCH), str(FRAMES), str(TOKENS), "2x32"]
  assert float(ours[8]) > 0 and pytorch[8] == "-"  # compile time: ours only
  our_median, pytorch_median = (float(re.match(r"[\d.]+", row[9]).group()) for row in (ours, pytorch))
  # The ratio is of the unrounded medians; the printed ones are rounded to 1 ms (~1% of a tiny PyTorch step).
  assert float(ours[12]) == pytest.approx(our_median / pytorch_median, rel=0.03) and pytorch[12] == "1.00"
  assert float(ours[11].split()[0]) > 0.1 and float(pytorch[11].split()[0]) > 0.1  # peak RSS in GB


def test_torch_passt_front_end_matches_ours():
  pytest.importorskip("hear21passt")
  from scripts import torch_passt_reference

  waveform = np.random.default_rng(5).uniform(-1, 1, 32000).astype(np.float32)
  front_end = torch_passt_reference.FrontEnd().eval()
  with torch.no_grad():
    got = front_end(torch.from_numpy(waveform[None]))[0, 0].numpy().T
  expected = passt_features.log_mel(waveform)
  assert got.shape == expected.shape == (passt_features.num_frames(32000), 128)
  np.testing.assert_allclose(got, expected, atol=2e-4)


def test_benchmark_random_roberta_large_is_ours():
  from scripts import benchmark_train

  ours = dataclasses.asdict(ROBERTA_LARGE)
  assert {k: benchmark_train._ROBERTA_LARGE[k] for k in ours} == ours
  assert benchmark_train.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert benchmark_train.peak_flops("NVIDIA A100-SXM4-80GB", "float32") == 156e12
  assert benchmark_train.peak_flops(None, "bfloat16") is None


def _table_rows(table: str) -> list[list[str]]:
  return [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]


@pytest.mark.slow
def test_benchmark_train_times_passt_roberta_in_both_frameworks(tmp_path):
  pytest.importorskip("hear21passt")
  import transformers

  text_dir = tmp_path / "roberta"
  tiny_roberta = {**TINY_BERT, "max_position_embeddings": TOKENS + 4, "type_vocab_size": 1, "pad_token_id": 1}
  transformers.RobertaConfig(**tiny_roberta).save_pretrained(str(text_dir))
  frames = 160  # 1.6 s: 10 patch columns, 3 dropped by patchout
  command = [
    sys.executable, "-m", "scripts.benchmark_train", "--config", "configs/clotho_passt_roberta.py", "--torch",
    "--repeats=2", "--warmup=1", "--steps_per_round=1", f"--config.model.text.model_dir={text_dir}",
    "--config.model.text.pretrained=False", f"--config.data.train_max_frames={frames}",
    f"--config.model.text.max_len={TOKENS}", f"--config.train.global_batch_size={BATCH}",
    "--config.model.audio.passt.depth=1", "--config.model.audio.passt.embed_dim=64",
    "--config.model.audio.passt.num_heads=4", "--config.model.audio.passt.mlp_dim=128",
    "--config.model.audio.passt.patchout_time=3", "--config.model.embed_dim=16", f"--matmul_rate={MATMUL_SIZE}",
  ]  # fmt: skip
  table = subprocess.run(command, capture_output=True, text=True, check=True).stdout
  assert "Audio: PaSST (1x64, patchout 3/2) on 1.6 s waveforms" in table and "text: roberta" in table, table
  header, ours, pytorch = _table_rows(table)
  assert ours[0] == "ours (JAX)" and pytorch[0] == "PyTorch"
  assert ours[3:7] == pytorch[3:7] == [str(BATCH), str(frames), str(TOKENS), "2x32"]
  for row in (ours, pytorch):
    median = float(re.match(r"[\d.]+", row[9]).group())
    assert 0 < median < 30 and np.isfinite(median)
    assert row[header.index("MFU")] == "-"  # on CPU
  gflop = float(ours[header.index("GFLOP / step")])
  assert gflop > 0  # XLA's cost analysis of the compiled step
  assert pytorch[header.index("time / PyTorch")] == "1.00"
  for row in (ours, pytorch):  # Each framework's own matmul rate, and the step's FLOP rate as a share of it.
    median, matmul = float(re.match(r"[\d.]+", row[9]).group()), float(row[header.index("matmul GFLOP/s")])
    assert matmul > 0.1
    share = float(row[header.index("step / matmul rate")].rstrip("%")) / 100
    assert share == pytest.approx(gflop / (median * matmul), rel=0.05, abs=1e-3)


@pytest.mark.slow
def test_benchmark_input_times_full_epochs_of_cropped_batches(tmp_path):
  command = [
    sys.executable,
    "-m",
    "scripts.benchmark_input",
    f"--cache_dir={tmp_path}",
    "--num_clips=6",
    "--duration_s=2",
    "--max_frames=150",
    "--batch_size=4",
    "--epochs=3",
    "--shuffle_buffer=50",
  ]
  table = subprocess.run(command, capture_output=True, text=True, check=True).stdout
  row = [cell.strip() for cell in table.splitlines()[-1].strip("|").split("|")]
  assert row[:5] == ["6", "2", "150", "4", str(6 * 5 // 4 * 4)], table  # every full batch of the 30 pairs
  epoch_s, first_batch_s = float(row[6]), float(row[7])
  assert 0 < first_batch_s <= epoch_s
  # An odd number of epochs: the median rate is that of the median epoch. The table rounds the rate to a whole pair
  # per second and the time to 1 ms: the rate read back from that time may differ by those roundings alone.
  pairs = 6 * 5 // 4 * 4
  rounding = 0.5 + pairs * 0.0005 / (epoch_s - 0.0005) ** 2
  assert float(row[8].split()[0]) == pytest.approx(pairs / epoch_s, abs=rounding)


@pytest.mark.slow
def test_benchmark_wavcaps_memory_reads_every_record_once(tmp_path):
  """The WavCaps-shaped benchmark at a tiny size: both steps read each record once per pass (the code before read
  the split once per padded length), and the tower's input stops at the 30 s segments' padded length."""
  command = [
    sys.executable,
    "-m",
    "scripts.benchmark_wavcaps_memory",
    f"--cache_dir={tmp_path}",
    "--num_clips=6",
    "--long_clips=1",
    "--short_max_s=5",
    "--max_s=40",
    "--repeats=1",
    "--batch_size=8",
  ]
  table = subprocess.run(command, capture_output=True, text=True, check=True).stdout
  header, _, *rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[-4:]]
  assert [row[2] for row in rows] == ["read", "embed"], table
  for row in rows:
    assert row[0] == "40 s" and row[1] == "7 (0.02)"
    assert row[header.index("reads / record")] == "1"
    assert int(row[header.index("old passes")]) > 1
    assert row[header.index("tower input (frames): now / old")] == "3,072 / 4,096"
