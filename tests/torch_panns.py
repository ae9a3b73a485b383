"""PyTorch references for the tests, written from SPEC 2-3: the PANNs CNN14 and ResNet38 towers (eval forward up to
the 2048-d clip embedding, PANNs state_dict names), a torch.stft + librosa log-mel front end, random weights and
BatchNorm statistics, and the PANNs checkpoint layout ({'iteration', 'model', 'sampler'}) with a sampler state
pickled under numpy 1.x module names, as in the released files."""
import pickle
import types

import librosa
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_MELS = 64


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False)


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)

    def forward(self, x, pool):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, kernel_size=pool)


class LogMelFrontEnd(nn.Module):
    """Waveform (B, L) at 32 kHz -> log-mel (B, T, 64): torch.stft (periodic Hann, reflect-centred), power, the
    librosa Slaney mel filterbank (50-14000 Hz, stored as `melW` like PANNs), 10 log10(max(., 1e-10))."""

    def __init__(self):
        super().__init__()
        mel = librosa.filters.mel(sr=32000, n_fft=1024, n_mels=NUM_MELS, fmin=50.0, fmax=14000.0)
        self.melW = nn.Parameter(torch.tensor(mel.T), requires_grad=False)

    def forward(self, waveform):
        window = torch.hann_window(1024, periodic=True, dtype=waveform.dtype)
        spectrum = torch.stft(waveform, n_fft=1024, hop_length=320, win_length=1024, window=window, center=True,
                              pad_mode='reflect', return_complex=True)
        power = spectrum.abs() ** 2  # (B, 513, T)
        mel = power.transpose(1, 2) @ self.melW.to(power.dtype)
        return 10.0 * torch.log10(torch.clamp(mel, min=1e-10))


class _PannsTower(nn.Module):
    """bn0 over mel bins + trunk + frequency mean, time max + mean; fc1/fc_audioset exist as in the releases."""

    def __init__(self, embed: int):
        super().__init__()
        self.logmel_extractor = LogMelFrontEnd()
        self.bn0 = nn.BatchNorm2d(NUM_MELS)
        self.fc1 = nn.Linear(embed, embed)
        self.fc_audioset = nn.Linear(embed, 527)

    def trunk(self, x):
        raise NotImplementedError

    def forward(self, log_mel):
        x = log_mel[:, None]  # (B, 1, T, mel): H = time, W = mel
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        x = self.trunk(x).mean(dim=3)
        return x.max(dim=2).values + x.mean(dim=2)

    def embed_waveform(self, waveform):
        return self.forward(self.logmel_extractor(waveform))


class Cnn14(_PannsTower):
    def __init__(self, channels=(64, 128, 256, 512, 1024, 2048), last_pool=(2, 2)):
        super().__init__(channels[-1])
        self.last_pool = tuple(last_pool)
        for index, (cin, cout) in enumerate(zip((1, *channels[:-1]), channels), start=1):
            setattr(self, f'conv_block{index}', ConvBlock(cin, cout))
        self.num_blocks = len(channels)

    def trunk(self, x):
        for index in range(1, self.num_blocks + 1):
            pool = self.last_pool if index == self.num_blocks else (2, 2)
            x = F.dropout(getattr(self, f'conv_block{index}')(x, pool), 0.2, self.training)
        return x


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.stride, self.dropout = stride, dropout
        self.conv1, self.bn1 = _conv3x3(cin, cout), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
                           if stride == 2 else None)

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
            setattr(self, f'layer{index}', nn.Sequential(*layer))
            cin = cout
        self.num_layers = len(widths)

    def forward(self, x):
        for index in range(1, self.num_layers + 1):
            x = getattr(self, f'layer{index}')(x)
        return x


class ResNet38(_PannsTower):
    def __init__(self, widths=(64, 128, 256, 512), blocks=(3, 4, 6, 3), out_features=2048, block_dropout=0.1):
        super().__init__(out_features)
        self.conv_block1 = ConvBlock(1, widths[0])
        self.resnet = ResNet(widths, blocks, block_dropout)
        self.conv_block_after1 = ConvBlock(widths[-1], out_features)

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
        module = getattr(obj, '__module__', None) or ''
        if module.startswith('numpy._core'):
            module = 'numpy.core' + module[len('numpy._core'):]
            self.write(pickle.GLOBAL + f'{module}\n{name or obj.__qualname__}\n'.encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


NUMPY1_PICKLE = types.SimpleNamespace(__name__='numpy1_pickle', Pickler=_Numpy1Pickler, Unpickler=pickle.Unpickler)


def save_panns_checkpoint(model: nn.Module, path: str) -> None:
    """torch.save of {'iteration', 'model': float32 state_dict, 'sampler'} in PANNs' layout; the sampler state holds
    numpy arrays and scalars pickled under numpy 1.x names."""
    rng = np.random.default_rng(0)
    sampler = {'indexes_per_class': [rng.permutation(10) for _ in range(3)],
               'queue': [np.int64(3), np.int64(7)], 'pointers_of_classes': [0, 2, np.int64(1)],
               'weights': rng.random(4, dtype=np.float32)}
    state_dict = {name: tensor.float() if tensor.is_floating_point() else tensor
                  for name, tensor in model.state_dict().items()}
    torch.save({'iteration': 660000, 'model': state_dict, 'sampler': sampler}, path, pickle_module=NUMPY1_PICKLE)
