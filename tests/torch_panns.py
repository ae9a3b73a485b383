"""PyTorch references for the tests, written from SPEC 2-3: the PANNs CNN14 (scripts/torch_reference.py) and
ResNet38 towers with the released files' extra modules (eval forward up to the 2048-d clip embedding, PANNs
state_dict names), a torch.stft + librosa log-mel front end, random weights and BatchNorm statistics, and the PANNs
checkpoint layout ({'iteration', 'model', 'sampler'}) with a sampler state pickled under numpy 1.x module names, as in
the released files."""

import pickle
import types

import librosa
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scripts import torch_reference
from scripts.torch_reference import NUM_MELS, conv3x3


class LogMelFrontEnd(nn.Module):
  """Waveform (B, L) at 32 kHz -> log-mel (B, T, 64): torch.stft (periodic Hann, reflect-centred), power, the
  librosa Slaney mel filterbank (50-14000 Hz, stored as `melW` like PANNs), 10 log10(max(., 1e-10))."""

  def __init__(self):
    super().__init__()
    mel = librosa.filters.mel(sr=32000, n_fft=1024, n_mels=NUM_MELS, fmin=50.0, fmax=14000.0)
    self.melW = nn.Parameter(torch.tensor(mel.T), requires_grad=False)

  def forward(self, waveform):
    window = torch.hann_window(1024, periodic=True, dtype=waveform.dtype)
    spectrum = torch.stft(
      waveform,
      n_fft=1024,
      hop_length=320,
      win_length=1024,
      window=window,
      center=True,
      pad_mode="reflect",
      return_complex=True,
    )
    power = spectrum.abs() ** 2  # (B, 513, T)
    mel = power.transpose(1, 2) @ self.melW.to(power.dtype)
    return 10.0 * torch.log10(torch.clamp(mel, min=1e-10))


class _ReleasedLayout:
  """What the released PANNs files hold beside the tower: the log-mel front end and the fc1 / fc_audioset
  heads (unused by the reference), so that state_dicts have the released keys."""

  def add_release_modules(self, embed: int) -> None:
    self.logmel_extractor = LogMelFrontEnd()
    self.fc1 = nn.Linear(embed, embed)
    self.fc_audioset = nn.Linear(embed, 527)

  def embed_waveform(self, waveform):
    return self(self.logmel_extractor(waveform))


class Cnn14(_ReleasedLayout, torch_reference.Cnn14):
  """The CNN14 of scripts/torch_reference.py with the released extras; no SpecAugment."""

  def __init__(self, channels=(64, 128, 256, 512, 1024, 2048), last_pool=(2, 2)):
    super().__init__(channels, last_pool, augment=False)
    self.add_release_modules(channels[-1])


class BasicBlock(nn.Module):
  def __init__(self, cin: int, cout: int, stride: int, dropout: float):
    super().__init__()
    self.stride, self.dropout = stride, dropout
    self.conv1, self.bn1 = conv3x3(cin, cout), nn.BatchNorm2d(cout)
    self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout)
    self.downsample = (
      nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)) if stride == 2 else None
    )

  def forward(self, x):
    out = F.avg_pool2d(x, 2) if self.stride == 2 else x
    out = F.dropout(F.relu(self.bn1(self.conv1(out))), self.dropout, self.training)
    out = self.bn2(self.conv2(out))
    return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


class ResNet(nn.Module):
  def __init__(self, widths, blocks, dropout):
    super().__init__()
    cin = widths[0]
    for index, (cout, count) in enumerate(zip(widths, blocks), start=1):
      stride = 1 if index == 1 else 2
      layer = [BasicBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1, dropout) for j in range(count)]
      setattr(self, f"layer{index}", nn.Sequential(*layer))
      cin = cout
    self.num_layers = len(widths)

  def forward(self, x):
    for index in range(1, self.num_layers + 1):
      x = getattr(self, f"layer{index}")(x)
    return x


class ResNet38(_ReleasedLayout, torch_reference.PannsTower):
  def __init__(self, widths=(64, 128, 256, 512), blocks=(3, 4, 6, 3), out_features=2048, block_dropout=0.1):
    super().__init__(augment=False)
    self.add_release_modules(out_features)
    self.conv_block1 = torch_reference.ConvBlock(1, widths[0])
    self.resnet = ResNet(widths, blocks, block_dropout)
    self.conv_block_after1 = torch_reference.ConvBlock(widths[-1], out_features)

  def trunk(self, x):
    x = F.dropout(self.conv_block1(x, (2, 2)), 0.2, self.training)
    x = F.dropout(F.avg_pool2d(self.resnet(x), 2), 0.2, self.training)
    return F.dropout(self.conv_block_after1(x, (1, 1)), 0.2, self.training)


def randomize(model: nn.Module, seed: int) -> nn.Module:
  """Random conv/linear weights (default init scaled so activations neither vanish nor explode), BN affine
  parameters and running statistics away from 1/0/0/1, then eval mode in float64."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.BatchNorm2d):
        channels = module.num_features
        module.weight.copy_(0.5 + torch.rand(channels, generator=generator))
        module.bias.copy_(0.3 * torch.randn(channels, generator=generator))
        module.running_mean.copy_(0.3 * torch.randn(channels, generator=generator))
        module.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
        module.num_batches_tracked.fill_(1000)
      elif isinstance(module, (nn.Conv2d, nn.Linear)):
        fan_in = module.weight[0].numel()
        module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
        if module.bias is not None:
          module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
  return model.double().eval()


class _Numpy1Pickler(pickle._Pickler):
  """Writes numpy globals under their numpy 1.x module names (numpy.core.*), as in files saved before numpy 2."""

  def save_global(self, obj, name=None):
    module = getattr(obj, "__module__", None) or ""
    if module.startswith("numpy._core"):
      module = "numpy.core" + module[len("numpy._core") :]
      self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
      self.memoize(obj)
      return
    super().save_global(obj, name)


NUMPY1_PICKLE = types.SimpleNamespace(__name__="numpy1_pickle", Pickler=_Numpy1Pickler, Unpickler=pickle.Unpickler)


def save_panns_checkpoint(model: nn.Module, path: str) -> None:
  """torch.save of {'iteration', 'model': float32 state_dict, 'sampler'} in PANNs' layout; the sampler state holds
  numpy arrays and scalars pickled under numpy 1.x names."""
  rng = np.random.default_rng(0)
  sampler = {
    "indexes_per_class": [rng.permutation(10) for _ in range(3)],
    "queue": [np.int64(3), np.int64(7)],
    "pointers_of_classes": [0, 2, np.int64(1)],
    "weights": rng.random(4, dtype=np.float32),
  }
  state_dict = {
    name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in model.state_dict().items()
  }
  torch.save({"iteration": 660000, "model": state_dict, "sampler": sampler}, path, pickle_module=NUMPY1_PICKLE)
