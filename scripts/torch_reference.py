"""PyTorch reference of our training step, written from SPEC 3-5 and 11: the PANNs CNN14 tower (PANNs state_dict
names, SpecAugment and dropout in training) on log-mels, or hear21passt's PaSST-S on waveforms (front end in the step,
scripts/torch_passt_reference.py); a Hugging Face `BertModel` or `RobertaModel` (no pooler) text tower, the
projection heads (two-layer MLPs, or one Linear layer with head_hidden 0), NT-Xent / InfoNCE / the multi-positive
InfoNCE, global-norm clipping and Adam, in float32 or under bfloat16 autocast. It is the yardstick of
`scripts.benchmark_train --torch` and the independent reference of tests/test_benchmarks.py; tests/torch_panns.py
builds its PANNs towers on `PannsTower`.

Owns: `ConvBlock`, `PannsTower`, `Cnn14`, `spec_augment`, `ProjectionHead`, `DualEncoder`, `contrastive_loss`,
`TrainStep` and `build_from_config` (our ml_collections config -> the same-size torch model and step).
"""

import json
import os

import ml_collections
import torch
import torch.nn.functional as F
import transformers
from torch import nn

NUM_MELS = 64
TIME_STRIPES, TIME_MAX_WIDTH = 2, 64
FREQ_STRIPES, FREQ_MAX_WIDTH = 2, 8
LOSSES = ("ntxent", "infonce", "infonce_multi")


def conv3x3(cin: int, cout: int) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False)


class ConvBlock(nn.Module):
  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.conv1, self.bn1 = conv3x3(cin, cout), nn.BatchNorm2d(cout)
    self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout)

  def forward(self, x, pool):
    x = F.relu(self.bn1(self.conv1(x)))
    x = F.relu(self.bn2(self.conv2(x)))
    return F.avg_pool2d(x, kernel_size=pool)


def _stripes(batch: int, size: int, count: int, max_width: int) -> torch.Tensor:
  """(batch, size) bool: `count` stripes per row of width U[0, max_width) at a uniform start inside the row."""
  widths = torch.randint(0, max_width, (batch, count)).clamp(max=size)
  starts = (torch.rand(batch, count) * (size - widths + 1)).floor().long()
  positions = torch.arange(size)
  return ((positions >= starts[..., None]) & (positions < (starts + widths)[..., None])).any(dim=1)


def spec_augment(x: torch.Tensor) -> torch.Tensor:
  """SpecAugment of (B, 1, T, mel): per example 2 time stripes of width U[0,64), then 2 mel stripes of width
  U[0,8), each at a uniform start, set to 0."""
  batch, _, frames, bins = x.shape
  drop = (
    _stripes(batch, frames, TIME_STRIPES, TIME_MAX_WIDTH)[:, :, None]
    | _stripes(batch, bins, FREQ_STRIPES, FREQ_MAX_WIDTH)[:, None, :]
  )
  return x.masked_fill(drop[:, None].to(x.device), 0.0)


class PannsTower(nn.Module):
  """log-mel (B, T, mel) -> bn0 over the mel bins (+ SpecAugment when training with `augment`) -> `trunk` ->
  mean over mel, then max + mean over time -> (B, C)."""

  def __init__(self, augment: bool):
    super().__init__()
    self.augment = augment
    self.bn0 = nn.BatchNorm2d(NUM_MELS)

  def trunk(self, x):
    raise NotImplementedError

  def forward(self, log_mel):
    x = log_mel[:, None]  # (B, 1, T, mel): H = time, W = mel
    x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
    if self.training and self.augment:
      x = spec_augment(x)
    x = self.trunk(x).mean(dim=3)
    return x.max(dim=2).values + x.mean(dim=2)


class Cnn14(PannsTower):
  """PANNs CNN14 trunk (SPEC 3): six ConvBlocks, 2x2 average pools (block 6: `last_pool`), dropout after each."""

  def __init__(
    self, channels=(64, 128, 256, 512, 1024, 2048), last_pool=(2, 2), dropout: float = 0.2, augment: bool = True
  ):
    super().__init__(augment)
    self.last_pool, self.dropout = tuple(last_pool), dropout
    for index, (cin, cout) in enumerate(zip((1, *channels[:-1]), channels), start=1):
      setattr(self, f"conv_block{index}", ConvBlock(cin, cout))
    self.num_blocks = len(channels)

  def trunk(self, x):
    for index in range(1, self.num_blocks + 1):
      pool = self.last_pool if index == self.num_blocks else (2, 2)
      x = F.dropout(getattr(self, f"conv_block{index}")(x, pool), self.dropout, self.training)
    return x


class ProjectionHead(nn.Module):
  """fc1 -> ReLU -> fc2, or with hidden 0 one Linear layer `linear` (the names of our Flax head)."""

  def __init__(self, cin: int, hidden: int, out: int):
    super().__init__()
    if hidden:
      self.fc1, self.fc2 = nn.Linear(cin, hidden), nn.Linear(hidden, out)
    else:
      self.linear = nn.Linear(cin, out)

  def forward(self, x):
    if hasattr(self, "linear"):
      return self.linear(x)
    return self.fc2(F.relu(self.fc1(x)))


class DualEncoder(nn.Module):
  """Audio tower (CNN14 on log-mels, or PaSST on waveforms) + BERT / RoBERTa + heads -> L2-normalised float32
  (audio, text) embeddings; text pooling 'cls' (first token) or 'mean'."""

  def __init__(
    self,
    audio: nn.Module,
    text: transformers.PreTrainedModel,
    pooling: str,
    embed_dim: int,
    head_hidden: int,
    audio_features: int,
  ):
    super().__init__()
    if pooling not in ("cls", "mean"):
      raise ValueError(f"text pooling {pooling!r} is not one of ('cls', 'mean')")
    self.audio, self.text, self.pooling = audio, text, pooling
    self.audio_head = ProjectionHead(audio_features, head_hidden, embed_dim)
    self.text_head = ProjectionHead(text.config.hidden_size, head_hidden, embed_dim)

  def forward(self, audio, input_ids, attention_mask):
    hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    if self.pooling == "cls":
      text = hidden[:, 0]
    else:
      weights = attention_mask.to(hidden.dtype)[:, :, None]
      text = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    audio, text = self.audio_head(self.audio(audio)), self.text_head(text)
    return F.normalize(audio.float(), dim=-1), F.normalize(text.float(), dim=-1)


def contrastive_loss(audio, text, clip_ids, name: str, temperature: float):
  """Symmetric cross entropy of cos(audio_i, text_j) / tau with the diagonal as target (SPEC 5); 'infonce'
  removes the other pairs of a clip from the denominators, 'ntxent' keeps them; 'infonce_multi' (SPEC 11) is
  -0.5 (mean over the same-clip pairs P of log_softmax(C, axis 1) + the same of axis 0), every pair a candidate."""
  if name not in LOSSES:
    raise ValueError(f"the torch reference has loss {LOSSES}, not {name!r}")
  logits = audio @ text.T / temperature
  if name == "infonce_multi":
    same_clip = clip_ids[:, None] == clip_ids[None, :]
    total = F.log_softmax(logits, dim=1)[same_clip].sum() + F.log_softmax(logits, dim=0)[same_clip].sum()
    return -0.5 * total / same_clip.sum()
  if name == "infonce":
    same_clip = clip_ids[:, None] == clip_ids[None, :]
    own = torch.eye(len(clip_ids), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(same_clip & ~own, float("-inf"))
  targets = torch.arange(len(clip_ids), device=logits.device)
  return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


class TrainStep:
  """One optimizer step: forward (under bfloat16 autocast when `autocast`), loss in float32, backward, global-norm
  clipping (0: none), Adam. Returns (loss, the gradient norm before clipping) as floats."""

  def __init__(
    self,
    model: DualEncoder,
    loss_name: str,
    temperature: float,
    learning_rate: float,
    grad_clip_norm: float,
    autocast: bool = False,
  ):
    self.model, self.loss_name, self.temperature, self.autocast = model, loss_name, temperature, autocast
    self.grad_clip_norm = grad_clip_norm
    self.params = [p for p in model.parameters() if p.requires_grad]
    self.optimizer = torch.optim.Adam(self.params, lr=learning_rate)

  def __call__(self, audio, input_ids, attention_mask, clip_ids) -> tuple[float, float]:
    """`audio`: the audio tower's input (log-mels (B, T, 64) or waveforms (B, L))."""
    self.model.train()
    self.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(audio.device.type, torch.bfloat16, enabled=self.autocast):
      audio, text = self.model(audio, input_ids, attention_mask)
    loss = contrastive_loss(audio, text, clip_ids, self.loss_name, self.temperature)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip_norm or float("inf"))
    self.optimizer.step()
    return float(loss.detach()), float(norm)


_TEXT_CONFIGS = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig}


def text_config(model_dir: str, dropout: float | None) -> transformers.PretrainedConfig:
  """The BERT or RoBERTa config of a HF folder's config.json, with `dropout` (when not None) on hidden states and
  attention probabilities, as our config.model.text.dropout does."""
  path = os.path.join(os.path.expanduser(model_dir), "config.json")
  with open(path) as f:
    raw = json.load(f)
  model_type = raw.get("model_type", "bert")
  if model_type not in _TEXT_CONFIGS:
    raise ValueError(f"{path}: the torch reference builds {tuple(_TEXT_CONFIGS)}, not {model_type!r}")
  if dropout is not None:
    raw.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
  return _TEXT_CONFIGS[model_type](**raw)


def _text_model(config: ml_collections.ConfigDict) -> transformers.PreTrainedModel:
  """model.text.arch "bert": a BertModel (with its pooler, unused); "roberta": a RobertaModel without pooler."""
  text_config_ = text_config(config.model.text.model_dir, config.model.text.dropout)
  if config.model.text.arch == "roberta":
    if text_config_.model_type != "roberta":
      raise ValueError(f"model.text.arch 'roberta' needs a RoBERTa folder, not {text_config_.model_type!r}")
    return transformers.RobertaModel(text_config_, add_pooling_layer=False)
  return transformers.BertModel(text_config_)


def build_from_config(config: ml_collections.ConfigDict) -> TrainStep:
  """A randomly initialised torch model and step of the same sizes as our model built from `config` (CNN14 or
  PaSST audio tower, BERT or RoBERTa text tower from the config.json of model.text.model_dir, loss ntxent, infonce
  or infonce_multi with a fixed temperature, optim.learning_rate, optim.grad_clip_norm, bfloat16 autocast when
  model.dtype is bfloat16)."""
  audio = config.model.audio
  if audio.arch not in ("cnn14", "passt"):
    raise ValueError(f"model.audio.arch {audio.arch!r}: the torch reference has CNN14 and PaSST only")
  if config.loss.learnable_temperature:
    raise ValueError("loss.learnable_temperature: the torch reference has a fixed temperature only")
  if audio.arch == "passt":
    from scripts import torch_passt_reference  # hear21passt, imported only when needed

    tower, audio_features = torch_passt_reference.tower_from_config(audio), audio.passt.embed_dim
  else:
    tower = Cnn14(tuple(audio.channels), tuple(audio.last_pool), audio.dropout, audio.spec_augment)
    audio_features = audio.channels[-1]
  model = DualEncoder(
    tower, _text_model(config), config.model.text.pooling, config.model.embed_dim, config.model.head_hidden,
    audio_features,
  )  # fmt: skip
  temperature = (
    config.loss.multi_positive_temperature if config.loss.name == "infonce_multi" else config.loss.temperature
  )
  return TrainStep(
    model, config.loss.name, temperature, config.optim.learning_rate, config.optim.grad_clip_norm,
    autocast=config.model.dtype == "bfloat16",
  )  # fmt: skip
