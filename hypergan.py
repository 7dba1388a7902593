"""HyperGAN: a generative model for diverse, performant neural networks.

Ratzlaff & Fuxin, ICML 2019 (arXiv:1901.11058). One annotated file, read next to the paper.

    s ~ N(0, I_s)                     noise, one vector per sampled network
    z = Q(s) = (z_1, ..., z_N)        the mixer: one d-dim code per target layer       (Fig. 1)
    theta_i = G_i(z_i)                one generator per layer -> that layer's weights  (Fig. 1)
    F(x; theta)                       the target network run with the generated weights
    loss = CE(F(x; theta), y) - beta * Dist(z, P)      Eq. (1) + Eq. (2), Dist = Eq. (3)
    D tells codes z_i from prior samples p_i ~ P = N(0, I_d), keeping the codes spread out,
    so every new s gives a new, different, accurate network: ensembles come for free.

Run:   python hypergan.py --dataset mnist --data-root ../shared/data --no-download
       python hypergan.py --dataset cifar10          (downloads CIFAR-10 into ./data)
       python hypergan.py --dataset synthetic-mnist  (offline, seconds; what the tests use)
Test:  python -m pytest -q test_hypergan.py

Measured results (the paper's Table 2 beside ours) and every choice the paper leaves open are in
paper_notes.md; each figure there names its command, hardware, wall time and seeds.
Sections follow the paper and read top to bottom:
  0 config · 1 data · 2 target networks · 3 mixer, generators, discriminator · 4 losses
  · 5 training · 6 evaluation · 7 checkpoints and export · 8 torchrun (optional) · 9 main

Glossary: s noise, Q mixer, z codes (K, N, d), G_i generator of layer i, theta generated
parameters, D discriminator, P prior N(0, I_d), beta weight of the adversarial term,
K networks sampled per step, b images per network.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# 0. Configuration. One dataclass; the command line is built from it (see `parse_args`).
#    Every default says where it comes from: the paper, the official code, or us (measured).
# ---------------------------------------------------------------------------------------------
DATASETS = ("mnist", "mnist5000", "cifar10", "cifar5", "synthetic-mnist", "synthetic-cifar10")


def option(default, help, **argparse_kwargs):
    return field(default=default, metadata=dict(help=help, **argparse_kwargs))


@dataclass
class Config:
    # what to run
    dataset: str = option("mnist", "which data set", choices=DATASETS)
    data_root: str = option("./data", "folder holding (or receiving) the torchvision data sets")
    download: bool = option(True, "download missing data sets (--no-download: use --data-root as is)")
    out_dir: str = option("runs/hypergan", "where checkpoint.pt, best.pt and results.json go")
    device: str = option("auto", "auto picks cuda, then mps, then cpu", choices=("auto", "cuda", "mps", "cpu"))
    seed: int = option(0, "seed of every random number generator of training (ours)")
    resume: bool = option(False, "continue from <out-dir>/checkpoint.pt (or --checkpoint)")
    eval_only: bool = option(False, "evaluate a checkpoint, no training (needs --checkpoint)")
    checkpoint: str = option("", "checkpoint to evaluate (needed by --eval-only) or to resume "
                                      "(default for --resume: <out-dir>/checkpoint.pt)")
    export: tuple = option((), "write N sampled networks as plain nn.Module state_dicts into folder PATH",
                        nargs=2, metavar=("N", "PATH"))
    synthetic_size: int = option(4096, "training images of the synthetic data sets (test set: a fifth, at "
                                    "least 1024); 50000 gives CIFAR-10's size for speed checks")
    # the method (PAPER.md sections 1-4); None means the dataset's recipe in RECIPES below
    s_dim: int = option(256, "dimension of the noise s (official code: 256)")
    d_dim: int = option(128, "dimension of each layer code z_i (official MNIST code: 128)")
    hidden: int = option(256, "width of the hidden layers of Q, every G_i and D (official code: 512; "
                           "ours 256: twice the steps/s on CPU and higher MNIST accuracy, measured)")
    init_spread: float = option(0.1, "initial size of each network's departure from the mean network, "
                                  "relative to PyTorch's init scale (ours, measured)")
    beta: float = option(None, "weight of the adversarial term, Eq. (2) (ours: 1; 10 tried, paper_notes.md)")
    networks_per_step: int = option(None, "K: networks sampled per training step (official: 32 or 100)")
    images_per_network: int = option(None, "b: images each sampled network sees per step (ours)")
    epochs: int = option(None, "passes over the training set")
    lr: float = option(None, "Adam learning rate of Q and every G_i, cosine-decayed to 0 (ours)")
    lr_d: float = option(1e-4, "Adam learning rate of D (official V1 MNIST: 1e-4)")
    pretrain_steps: int = option(100, "mixer pre-training steps matching codes to the prior's moments; "
                                   "0 turns it off (official README: on, <= 100 steps for MNIST)")
    # evaluation
    val_size: int = option(5000, "training images held out for checkpoint selection (ours)")
    val_networks: int = option(10, "networks sampled for the validation accuracy after each epoch")
    eval_networks: int = option(300, "networks sampled for the final test evaluation; ensembles of "
                                  "1, 5, 10, 100 are disjoint groups of them")
    eval_seed: int = option(1234, "seed of the fixed noise that samples the evaluated networks")
    bf16: bool = option(True, "bf16 autocast on CUDA (no effect on cpu/mps)")
    log_every: int = option(0, "log every this many steps (0: five lines per epoch)")


# The per-dataset recipe fills every None above. The MNIST and MNIST-5000 recipes are the ones
# measured in paper_notes.md (section 3); the CIFAR ones are untested starting points (no CIFAR
# copy was reachable when they were written); the synthetic ones are sized for the tests.
RECIPES = {
    "mnist":      dict(epochs=20, networks_per_step=16, images_per_network=8, lr=1e-3, beta=1.0),
    "mnist5000":  dict(epochs=60, networks_per_step=16, images_per_network=8, lr=1e-3, beta=1.0),
    "cifar10":    dict(epochs=60, networks_per_step=16, images_per_network=8, lr=1e-3, beta=1.0),
    "cifar5":     dict(epochs=60, networks_per_step=16, images_per_network=8, lr=1e-3, beta=1.0),
    "synthetic-mnist":   dict(epochs=3, networks_per_step=8, images_per_network=8, lr=1e-3, beta=1.0),
    "synthetic-cifar10": dict(epochs=3, networks_per_step=8, images_per_network=8, lr=1e-3, beta=1.0),
}


class UserError(Exception):
    """Bad input or a failed run: main prints the message as one line and exits non-zero."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise UserError(f"{message} (see --help)")


def parse_args(argv=None):
    p = ArgumentParser(description="HyperGAN (Ratzlaff & Fuxin, ICML 2019): train, evaluate, export.")
    for f in dataclasses.fields(Config):
        kw = dict(f.metadata)
        kw["help"] += " (default: the dataset's recipe, RECIPES)" if f.default is None else f" (default: {f.default})"
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):  # --resume; --download / --no-download
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            p.add_argument(flag, action=action, default=f.default, **kw)
        elif f.name == "export":
            p.add_argument(flag, default=f.default, **kw)
        else:
            t = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, type=t, default=f.default, **kw)
    cfg = Config(**vars(p.parse_args(argv)))
    for key, value in RECIPES[cfg.dataset].items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    for key, low in (("networks_per_step", 2), ("images_per_network", 1), ("epochs", 1), ("eval_networks", 1),
                     ("val_networks", 1), ("synthetic_size", 64)):
        if getattr(cfg, key) < low:  # BatchNorm in Q and G needs at least 2 networks per step
            raise UserError(f"--{key.replace('_', '-')} must be at least {low}, got {getattr(cfg, key)}")
    if cfg.export:
        n, path = cfg.export
        if not n.isdigit() or int(n) < 1:
            raise UserError(f"--export N PATH needs a positive number of networks, got {n!r}")
        cfg.export = (int(n), path)
    return cfg


def set_seed(seed):
    torch.manual_seed(seed)  # seeds the CPU and every CUDA generator; data splits have their own


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[name]:
        raise UserError(f"--device {name} was asked for but is not available here; use --device auto")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------
# 1. Data. Every split lives as one normalised tensor on the device; batches are index lookups
#    and CIFAR's crop+flip runs on the device in batch (the airbench way): no DataLoader.
# ---------------------------------------------------------------------------------------------
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)                                # official code
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # official code


def synthetic_split(shape, num_classes, n, seed):
    """A learnable offline stand-in: each class is a fixed smooth random pattern; every image is
    its class pattern, shifted by up to 2 pixels, plus pixel noise. `seed` picks the split's
    images (train 1, test 2), not the run's --seed."""
    C, H, W = shape
    g = torch.Generator().manual_seed(0)                                # the same classes in every split
    patterns = F.interpolate(torch.randn(num_classes, C, H // 4, W // 4, generator=g), size=(H, W),
                             mode="bilinear", align_corners=False)      # (classes, C, H, W), smooth
    g = torch.Generator().manual_seed(seed)                             # this split's images
    y = torch.randint(num_classes, (n,), generator=g)
    x = torch.stack([torch.roll(patterns[c], shifts=(int(sy), int(sx)), dims=(1, 2)) for c, sy, sx in
                     zip(y.tolist(), *torch.randint(-2, 3, (2, n), generator=g))])
    x = x + 0.8 * torch.randn(n, C, H, W, generator=g)
    return x, y


def torchvision_split(name, root, train, download):
    import torchvision  # only the real data sets need it
    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    try:
        ds = cls(root, train=train, download=download)
    except Exception as e:  # torchvision raises RuntimeError offline, URLError when downloads fail
        how = ("pass --no-download only when --data-root already holds it" if not download else
               "check the network, or put the files there and pass --no-download")
        raise UserError(f"could not load {name} from {root!r} ({type(e).__name__}: {str(e).splitlines()[0]}); {how}")
    x = torch.as_tensor(ds.data)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)   # (n, C, H, W) uint8
    return x.float().div(255), torch.as_tensor(ds.targets).long()


def load_data(cfg, device):
    """Returns dict(train=(x, y), val=(x, y), test=(x, y), num_classes, arch, augment).
    Deviation (official code selected on the test set): the validation split is held out of the
    training set with a fixed generator (seed 0), so it is the same images whatever --seed says;
    the test set is never used for selection."""
    name = cfg.dataset
    if name.startswith("synthetic"):
        shape = (1, 28, 28) if name == "synthetic-mnist" else (3, 32, 32)
        x, y = synthetic_split(shape, 10, cfg.synthetic_size, seed=1)
        x_test, y_test = synthetic_split(shape, 10, max(1024, cfg.synthetic_size // 5), seed=2)
        mean, std = (0.0,) * shape[0], (1.0,) * shape[0]   # already zero-mean, unit-noise
        arch = "small" if shape[0] == 1 else "mednet"
        val_size = min(cfg.val_size, 512)
    else:
        base = "mnist" if name.startswith("mnist") else "cifar10"
        x, y = torchvision_split(base, cfg.data_root, True, cfg.download)
        x_test, y_test = torchvision_split(base, cfg.data_root, False, cfg.download)
        mean, std = (MNIST_MEAN, MNIST_STD) if base == "mnist" else (CIFAR_MEAN, CIFAR_STD)
        arch = "small" if base == "mnist" else "mednet"
        val_size = cfg.val_size
    num_classes = 10
    if name == "cifar5":  # CIFAR-5 = the first five classes of CIFAR-10 (Table 2 caption)
        keep, keep_test = y < 5, y_test < 5
        x, y, x_test, y_test, num_classes = x[keep], y[keep], x_test[keep_test], y_test[keep_test], 5
    if not 0 < val_size < len(x):
        raise UserError(f"--val-size must be between 1 and {len(x) - 1}, got {val_size}")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    val, train = order[:val_size], order[val_size:]
    if name == "mnist5000":
        # Deviation (official code): a fixed, seeded 5,000-image subset, not 159 fresh batches an epoch.
        train = train[:5000]
    mean, std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)   # (C, 1, 1)
    norm = lambda t: ((t - mean) / std).to(device)
    return dict(train=(norm(x[train]), y[train].to(device)), val=(norm(x[val]), y[val].to(device)),
                test=(norm(x_test), y_test.to(device)), num_classes=num_classes, arch=arch,
                augment=name in ("cifar10", "cifar5", "synthetic-cifar10"), black=norm(torch.zeros(1, 1, 1)))


def augment_batch(x, black, generator=None):
    """CIFAR augmentation of the official code, on the device in batch: random crop 32 out of the
    image padded by 4 black pixels (40x40), then a horizontal flip with probability 1/2.
    x: (B, C, H, W), normalised; black: (C, 1, 1), the normalised value of a black pixel."""
    B, C, H, W = x.shape
    padded = F.pad(x - black, (4, 4, 4, 4)) + black                           # (B, C, H+8, W+8)
    dy, dx = torch.randint(0, 9, (2, B, 1), device=x.device, generator=generator)
    rows = (dy + torch.arange(H, device=x.device))[:, None, :, None]          # (B, 1, H, 1)
    cols = (dx + torch.arange(W, device=x.device))[:, None, None, :]          # (B, 1, 1, W)
    x = padded[torch.arange(B, device=x.device)[:, None, None, None],
               torch.arange(C, device=x.device)[None, :, None, None], rows, cols]
    flip = torch.rand(B, 1, 1, 1, device=x.device, generator=generator) < 0.5
    return torch.where(flip, x.flip(-1), x)


# ---------------------------------------------------------------------------------------------
# 2. Target networks F(x; theta) (PAPER.md section 3). Each is an ordinary nn.Sequential: it is
#    what `--export` fills with one sampled theta. `functional_forward` runs K of them at once.
# ---------------------------------------------------------------------------------------------
def small_net(num_classes=10):
    """MNIST target of the official code: conv 1->32 5x5, conv 32->32 5x5, linear 512->10.
    Deviation (exact): max-pooling is written before the activation; for a non-decreasing f,
    max(f(a), f(b)) = f(max(a, b)), so this equals conv->act->pool with a 4x smaller activation."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 5), nn.MaxPool2d(2), nn.LeakyReLU(0.01),      # (B, 32, 12, 12)
        nn.Conv2d(32, 32, 5), nn.MaxPool2d(2), nn.LeakyReLU(0.01),     # (B, 32, 4, 4)
        nn.Flatten(), nn.Linear(512, num_classes))


def mednet(num_classes=10):
    """CIFAR target of the paper era (official V1 'mednet'): conv 16/32/32 3x3 without padding,
    each followed by pooling, then linear 128->64->classes."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.MaxPool2d(2), nn.ReLU(),               # (B, 16, 15, 15)
        nn.Conv2d(16, 32, 3), nn.MaxPool2d(2), nn.ReLU(),              # (B, 32, 6, 6)
        nn.Conv2d(32, 32, 3), nn.MaxPool2d(2), nn.ReLU(),              # (B, 32, 2, 2)
        nn.Flatten(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, num_classes))


TARGETS = {"small": small_net, "mednet": mednet}


def param_layers(net):
    """The layers whose parameters HyperGAN generates, in order: layer i gets generator G_i."""
    return [m for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]


def shared_input_conv(x, weight, bias, layer):
    """K networks' first convolution of one shared batch x (B, C, H, W) -> (B, K*O, H', W').
    One matmul of the image patches with all K*O filters, written channels-last, so the image is
    never copied K times. Equal to F.conv2d(x, weight.flatten(0, 1), bias.flatten()); measured on this CPU
    (100 networks x 10,000 MNIST images) 41 s against 78 s, the pooling after it reading the
    channels-last layout 2x faster."""
    B, _, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    patches = F.unfold(x, (kh, kw), padding=(ph, pw), stride=(sh, sw)).transpose(1, 2)  # (B, Ho*Wo, C*kh*kw)
    filters = weight.flatten(0, 1).flatten(1).t()                                        # (C*kh*kw, K*O)
    out = torch.addmm(bias.flatten(), patches.flatten(0, 1), filters)                    # (B*Ho*Wo, K*O)
    return out.view(B, Ho, Wo, -1).permute(0, 3, 1, 2)                                   # (B, K*O, Ho, Wo)


def functional_forward(net, theta, x):
    """Run K copies of the target `net`, copy k with parameters theta[i] = (weight_i[k], bias_i[k]).

    theta: one (weight (K, *shape), bias (K, out)) pair per layer of `param_layers(net)`.
    x: (K, B, C, H, W), network k sees its own images x[k] (training), or (B, C, H, W), one
    batch shared by all K networks (evaluation). Returns logits (K, B, classes).

    Why grouped convolution: the K networks' feature maps are stacked along the channel axis,
    (B, K*C, H, W), network k owning channel block k, and one conv with groups=K applies each
    network's filters to its own block only. Measured here (2-core CPU, K=16 networks x 8 images,
    forward+backward): grouped 15.6 ms, a Python loop over networks 18.3 ms; at 64 x 2: 17 vs 47
    ms. It is one kernel launch per layer on a GPU. Pooling and activations act per channel, so
    they run on the stacked tensor unchanged."""
    K = theta[0][0].shape[0]
    if x.dim() == 5:                                                # (K, B, C, H, W) -> (B, K*C, H, W)
        # Stored channels-last, the layout the grouped convolutions and the pooling read fastest:
        # measured on this CPU, 33 -> 28 ms per default training step, 2.3 -> 1.4 s at 100 x 100.
        h = x.transpose(0, 1).flatten(1, 2).contiguous(memory_format=torch.channels_last)
    else:
        h = x                                                       # one batch shared by all K networks
    params = iter(theta)
    for layer in net:
        if isinstance(layer, nn.Conv2d):
            weight, bias = next(params)                             # (K, O, C, kh, kw), (K, O)
            if h.shape[1] == K * layer.in_channels:                 # network k's channels are block k
                h = F.conv2d(h, weight.flatten(0, 1), bias.flatten(), layer.stride, layer.padding, groups=K)
            else:                                                   # input shared by all K networks
                h = shared_input_conv(h, weight, bias, layer)
        elif isinstance(layer, nn.Flatten):
            h = h.unflatten(1, (K, -1)).flatten(2).transpose(0, 1)  # (B, K*C, H, W) -> (K, B, C*H*W)
        elif isinstance(layer, nn.Linear):
            weight, bias = next(params)                             # (K, O, I), (K, O)
            if h.dim() == 2:                                        # shared (B, I) input of an MLP
                h = h.expand(K, *h.shape)
            h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))  # (K, B, O) = h W^T + b
        else:
            h = layer(h)                                            # activation / pooling / dropout
    return h                                                        # (K, B, classes)


def theta_to_state_dict(net, theta, k):
    """Network k of a generated stack as an ordinary state_dict of `net` (for --export)."""
    tensors = [t[k] for pair in theta for t in pair]
    return {name: t.detach().float().cpu().clone() for (name, _), t in zip(net.named_parameters(), tensors)}


# ---------------------------------------------------------------------------------------------
# 3. The hypernetwork (PAPER.md 1.1, 2.2): mixer Q, generators G_1..G_N, discriminator D.
# ---------------------------------------------------------------------------------------------
def mlp(sizes, act, batchnorm):
    """Linear layers with (BatchNorm and) an activation between them; the last layer is linear."""
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers += [nn.BatchNorm1d(n_out)] if batchnorm else []
            layers.append(act())
    return nn.Sequential(*layers)


class HyperGAN(nn.Module):
    """The mixer Q and the generators G_1..G_N for the target `net` (only its shapes are read).

    Q: s (K, s_dim) -> z (K, N, d), Linear-BN-ReLU x2 then Linear, as the official code.
    G_i: z_i (K, d) -> theta_i, Linear-BN-ELU x2 then Linear (official MNIST generators).
    forward(s) = (z, theta): everything Eq. (2) trains. The discriminator is `discriminator` below.
    """

    def __init__(self, net, s_dim=256, d_dim=128, hidden=256, init_spread=0.1):
        super().__init__()
        self.s_dim, self.d_dim = s_dim, d_dim
        self.shapes = [(tuple(m.weight.shape), tuple(m.bias.shape)) for m in param_layers(net)]
        N = len(self.shapes)
        self.Q = mlp([s_dim, hidden, hidden, N * d_dim], nn.ReLU, batchnorm=True)
        # Biases are generated too (as the 2019 official code): each G_i outputs weight ‖ bias.
        self.G = nn.ModuleList(mlp([d_dim, hidden, hidden, math.prod(w) + math.prod(b)], nn.ELU, batchnorm=True)
                               for w, b in self.shapes)
        # Deviation (ours; the official code has none of this). The last layer of G_i computes
        #     theta_i = scale_i * (W h) + bias,   h = G_i's last hidden layer,
        # with scale_i = 1/sqrt(fan_in) of target layer i (PyTorch's default init scale). The
        # bias starts as a fresh default init of the target layer, so it is the mean network and
        # Adam moves it as fast as a plain network's weights; W h is each network's departure
        # from it, started at init_spread (0.1) x the init scale. Measured on MNIST after one
        # epoch: unscaled, the initial CE is ~240 (logits explode); scaling the whole output
        # gives 89.0 % validation accuracy, this form 93.4 %, and 95.6 % with init_spread 0.1 and
        # the Adam betas below (paper_notes.md, section 3).
        self.scales = [1 / math.sqrt(math.prod(w[1:])) for w, _ in self.shapes]
        with torch.no_grad():
            for G, layer in zip(self.G, param_layers(net)):
                G[-1].bias.copy_(torch.cat([layer.weight.flatten(), layer.bias.flatten()]))
                G[-1].weight.mul_(init_spread)

    def sample_s(self, K, generator=None):
        device = next(self.parameters()).device
        return torch.randn(K, self.s_dim, device=device, generator=generator)        # s ~ N(0, I_s)

    def codes(self, s):
        return self.Q(s).view(len(s), len(self.shapes), self.d_dim)            # z: (K, N, d)

    def generate(self, z):
        """theta_i = G_i(z_i) for every layer i: a list of (weight (K, *w), bias (K, *b))."""
        theta = []
        for i, (G, (w, b)) in enumerate(zip(self.G, self.shapes)):
            h, last = G[:-1](z[:, i]), G[-1]                                   # (K, hidden)
            out = F.linear(h, last.weight) * self.scales[i] + last.bias        # (K, |w| + |b|)
            theta.append((out[:, :math.prod(w)].view(-1, *w), out[:, math.prod(w):].view(-1, *b)))
        return theta

    def forward(self, s):
        z = self.codes(s)
        return z, self.generate(z)


def discriminator(d_dim=128, hidden=256):
    """D: a layer code (.., d) -> one logit; the paper's D(x) is sigmoid(logit). One D is shared
    by all N layer codes (Fig. 1), as in the official code. No BatchNorm (official code)."""
    return mlp([d_dim, hidden, hidden, 1], nn.ReLU, batchnorm=False)


# ---------------------------------------------------------------------------------------------
# 4. Losses (PAPER.md 1.2). D works on logits l: log D(x) = logsigmoid(l) and
#    log(1 - D(x)) = logsigmoid(-l), the numerically safe forms of the same quantities.
# ---------------------------------------------------------------------------------------------
def discriminator_loss(D, z, p):
    """Eq. (3): Dist = -sum_{i=1..N} ( log D(p_i) + log(1 - D(z_i)) ), averaged over the K samples.
    D minimises it: D(prior) -> 1, D(codes) -> 0. z, p: (K, N, d). (One call of D on both halves:
    DistributedDataParallel expects one forward per backward.)"""
    logit_p, logit_z = D(torch.cat([p, z])).squeeze(-1).chunk(2)               # (K, N) each
    return -(F.logsigmoid(logit_p) + F.logsigmoid(-logit_z)).sum(1).mean()


def mixer_adversarial_loss(D, z):
    """Q's share of Eq. (2), min over Q of [CE - beta * Dist]: the prior term of Dist does not
    depend on Q, so Q minimises sum_i log(1 - D(z_i)), the minimax form exactly as written
    (it pushes D(z_i) towards 1, 'looks like the prior')."""
    return F.logsigmoid(-D(z)).squeeze(-1).sum(1).mean()


def pretrain_mixer(model, steps, batch=1000):
    """Optional (official README: on): before training, fit Q so that each layer code z_i has the
    prior's mean 0 and covariance I over a batch of noise. Deviation: the official code compares
    with the moments of a sampled N(0, I) batch; we use the exact moments 0 and I."""
    if steps <= 0:
        return None
    optimizer = torch.optim.Adam(model.Q.parameters(), lr=1e-3)
    eye = torch.eye(model.d_dim, device=next(model.parameters()).device)
    for _ in range(steps):
        z = model.codes(model.sample_s(batch)).transpose(0, 1)                # (N, batch, d)
        mean = z.mean(1)                                                      # (N, d)
        cov = (z - mean[:, None]).transpose(1, 2) @ (z - mean[:, None]) / (batch - 1)  # (N, d, d)
        loss = mean.pow(2).mean() + (cov - eye).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()


# ---------------------------------------------------------------------------------------------
# 5. Training. One step = one D update on Eq. (3), then one Q+G update on Eq. (2) (1:1 as the
#    official code). Deviation (ours): each of the K sampled networks sees its own b images, so a
#    step covers K*b distinct images for the cost of K*b network-image passes; the official code
#    shows one batch to all networks. Both estimate the same expectation of Eq. (1).
# ---------------------------------------------------------------------------------------------
def train_step(model, D, net, opts, x, y, beta, autocast, ddp=None):
    """x: (K, b, C, H, W), y: (K, b). Returns the step's statistics as tensors (no host sync).
    ddp: under torchrun, (model, D) wrapped in DistributedDataParallel (section 8), which averages
    their gradients across processes inside backward(); otherwise None and the plain modules run.
    D's losses are computed in float32, outside the bf16 autocast."""
    opt_qg, opt_d = opts
    model_fwd, D_fwd = ddp if ddp else (model, D)
    s = model.sample_s(x.shape[0])                                            # s ~ N(0, I_s): (K, s_dim)
    with autocast:
        z, theta = model_fwd(s)                                               # z: (K, N, d); theta per layer
    z = z.float()
    # D step, Eq. (3): minimise Dist over D; the codes are constants here.
    p = torch.randn_like(z)                                                   # p_i ~ P = N(0, I_d)
    d_loss = discriminator_loss(D_fwd, z.detach(), p)
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    # Q, G step, Eq. (2): minimise E[CE(F(x; G(Q(s))), y)] - beta * Dist over Q and G.
    with autocast:
        logits = functional_forward(net, theta, x)                           # (K, b, classes)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())           # Eq. (1)
    D.requires_grad_(False)                                                   # D is held fixed here
    q_adv = mixer_adversarial_loss(D, z)
    D.requires_grad_(True)
    loss = ce + beta * q_adv
    opt_qg.zero_grad(set_to_none=True)
    loss.backward()
    opt_qg.step()
    with torch.no_grad():
        Dp, Dz = torch.sigmoid(D(p)).mean(), torch.sigmoid(D(z)).mean()       # the paper's D(p), D(z)
        acc = (logits.argmax(-1) == y).float().mean()
    return torch.stack([ce.detach(), d_loss.detach(), q_adv.detach(), Dp, Dz, acc])


STAT_NAMES = ("ce", "d_loss", "q_adv", "D(p)", "D(z)", "acc")


def make_optimizers(model, D, cfg, total_steps):
    # Adam for Q and the G_i together, a second Adam for D (the official code: one per module).
    # Deviation: betas (0.9, 0.999) for Q and G, not the official (0.5, 0.9); against (0.5, 0.999)
    # they gave 94.3 vs 93.5 % validation accuracy after one MNIST epoch (measured). D: beta1 0.5
    # as the official code, beta2 0.999 (ours, not tuned). fused=True: one kernel updates all
    # parameters; measured 118 -> 70 ms per CPU step (hidden 512), the optimiser being the largest
    # part of a step's cost.
    opt_qg = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), fused=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=(0.5, 0.999), fused=True)
    # Deviation (ours): cosine decay of Q and G's rate to 0 over the run (the official code keeps
    # it constant or restarts it every 10 epochs); it decides the final accuracy in a short run.
    cosine = lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total_steps) / total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt_qg, cosine)
    return (opt_qg, opt_d), sched


def train(cfg, model, D, net, data, device, state, rank=0, world=1, ddp=None):
    """The training loop; `state` holds the optimisers, scheduler, epoch and history, and is
    what the checkpoint saves at the end of every epoch. Under torchrun (world > 1) process
    `rank` trains on its own K*b images of every world*K*b batch, and rank 0 alone logs,
    validates and writes checkpoints."""
    x_train, y_train = data["train"]
    K, b = cfg.networks_per_step, cfg.images_per_network
    steps_per_epoch = len(x_train) // (K * b * world)
    if steps_per_epoch == 0:
        raise UserError(f"the training set ({len(x_train)} images) is smaller than one step's K*b = {K * b * world}")
    log = print if rank == 0 else (lambda *a, **k: None)
    total = steps_per_epoch * cfg.epochs
    log_every = cfg.log_every or max(1, steps_per_epoch // 5)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.bf16)
    log(f"{'epoch':>5} {'step':>7} " + " ".join(f"{n:>8}" for n in STAT_NAMES) + f" {'ms/step':>8} {'ETA':>7}")
    for epoch in range(state["epoch"], cfg.epochs):
        t_epoch = time.perf_counter()
        model.train()
        # The epoch's order depends on (seed, epoch) alone, so --resume replays it exactly.
        g = torch.Generator(device="cpu").manual_seed(cfg.seed * 100_003 + epoch)  # 100_003: a prime
        order = torch.randperm(len(x_train), generator=g).to(device)
        sums, n_sum, t_log = torch.zeros(len(STAT_NAMES), device=device), 0, time.perf_counter()
        for i in range(steps_per_epoch):
            start = (i * world + rank) * K * b                             # this process's shard
            idx = order[start:start + K * b]
            x = x_train[idx]
            if data["augment"]:
                x = augment_batch(x, data["black"])
            x, y = x.view(K, b, *x.shape[1:]), y_train[idx].view(K, b)     # network k gets x[k]
            sums += train_step(model, D, net, state["opts"], x, y, cfg.beta, autocast, ddp)
            state["sched"].step()
            n_sum += 1
            if (i + 1) % log_every == 0 or i + 1 == steps_per_epoch:
                stats = (sums / n_sum).tolist()                           # the only host sync
                if not all(map(math.isfinite, stats)):
                    raise UserError(f"a loss became non-finite at epoch {epoch + 1}, step {i + 1} "
                                    f"({dict(zip(STAT_NAMES, stats))}); lower --lr or --beta. "
                                    f"The last good checkpoint was kept")
                ms = (time.perf_counter() - t_log) * 1000 / n_sum
                eta = ms / 1000 * (total - epoch * steps_per_epoch - i - 1)
                log(f"{epoch + 1:>5} {epoch * steps_per_epoch + i + 1:>7} "
                    + " ".join(f"{v:8.4f}" for v in stats) + f" {ms:8.1f} {eta / 60:6.1f}m", flush=True)
                sums, n_sum, t_log = torch.zeros_like(sums), 0, time.perf_counter()
        state["epoch"] = epoch + 1
        state["steps"] += steps_per_epoch
        if rank != 0:
            continue
        # End of epoch: validation accuracy of single sampled networks (selection uses it).
        val = evaluate(model, net, *data["val"], cfg.val_networks, seed=cfg.eval_seed, sizes=(1,))
        state["seconds"] += time.perf_counter() - t_epoch         # training (+ validation) time
        state["history"].append(dict(epoch=epoch + 1, train=dict(zip(STAT_NAMES, stats)),
                                     val_single_mean=val["single_mean"], seconds=state["seconds"]))
        improved = val["single_mean"] > state["best_val"]
        if improved:
            state["best_val"] = val["single_mean"]
        save_checkpoint(os.path.join(cfg.out_dir, "checkpoint.pt"), cfg, model, D, state)
        if improved:
            save_checkpoint(os.path.join(cfg.out_dir, "best.pt"), cfg, model, D, state)
        print(f"epoch {epoch + 1}: validation accuracy of one sampled network {100 * val['single_mean']:.2f}"
              f" ± {100 * val['single_std']:.2f} % ({cfg.val_networks} networks)"
              + ("  -> best.pt" if improved else ""), flush=True)


# ---------------------------------------------------------------------------------------------
# 6. Evaluation (Table 2's shape). Deviation: BatchNorm of Q and G in eval mode, so one network can
#    be sampled alone (the official code kept training mode and needed a batch of 32); the noise comes
#    from a fixed generator, so every checkpoint is judged on the same s.
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_probs(model, net, x, n_networks, seed, nets_per_chunk=None, images_per_chunk=None):
    """Softmax outputs of n_networks sampled networks on x: (n_networks, len(x), classes).
    Networks and images go in chunks, so memory stays bounded whatever n_networks is. On a CPU,
    small chunks (10 networks x 50 images, whose activations fit in cache) measured fastest: 79 s
    against 104 s at 10 x 500 for 100 networks on 10,000 images; a GPU gets 100 x 500, one kernel
    per layer for 100 networks (not measured)."""
    small = x.device.type == "cpu"
    nets_per_chunk = nets_per_chunk or (10 if small else 100)
    images_per_chunk = images_per_chunk or (50 if small else 500)
    was_training = model.training
    model.eval()
    g = torch.Generator(device=x.device).manual_seed(seed)
    out = []
    for k0 in range(0, n_networks, nets_per_chunk):
        theta = model.generate(model.codes(model.sample_s(min(nets_per_chunk, n_networks - k0), g)))
        out.append(torch.cat([functional_forward(net, theta, x[i:i + images_per_chunk]).float().softmax(-1)
                              for i in range(0, len(x), images_per_chunk)], dim=1))
    model.train(was_training)
    return torch.cat(out)


def expected_calibration_error(probs, y, bins=15):
    """ECE: |accuracy - confidence| averaged over equal-width confidence bins, weighted by size."""
    conf, pred = probs.max(-1)
    edges = torch.linspace(0, 1, bins + 1, device=probs.device)
    which = torch.bucketize(conf, edges[1:-1])                                # bin of each input
    ece = torch.zeros((), device=probs.device)
    for k in range(bins):
        m = which == k
        if m.any():
            ece += m.float().mean() * ((pred[m] == y[m]).float().mean() - conf[m].mean()).abs()
    return ece.item()


def disagreement(probs):
    """Mean over test inputs of the fraction of network pairs whose predicted classes differ.
    With c_j networks voting class j out of M: differing pairs = (M^2 - sum_j c_j^2) / 2."""
    M = probs.shape[0]
    votes = F.one_hot(probs.argmax(-1), probs.shape[-1]).sum(0).float()       # (n_images, classes)
    return ((M * M - votes.pow(2).sum(-1)) / (M * (M - 1))).mean().item()


def evaluate(model, net, x, y, n_networks, seed, sizes=(1, 5, 10, 100)):
    """Accuracy of single networks and of ensembles (mean of softmax) of each size in `sizes`.
    Ensembles of size m are the disjoint groups of m among the n_networks sampled networks, so the
    draws are independent; each size reports mean and std over its groups (null if n < m)."""
    probs = sample_probs(model, net, x, n_networks, seed)                     # (n, images, classes)
    single = (probs.argmax(-1) == y).float().mean(1)                          # (n,)
    result = dict(single_mean=single.mean().item(), single_std=single.std().item() if n_networks > 1 else 0.0,
                  ensemble={}, nll={}, ece={})
    for m in sizes:
        groups = n_networks // m
        if groups == 0:
            result["ensemble"][str(m)] = result["nll"][str(m)] = result["ece"][str(m)] = None
            continue
        p = probs[:groups * m].view(groups, m, *probs.shape[1:]).mean(1)     # (groups, images, classes)
        acc = (p.argmax(-1) == y).float().mean(1)
        log_p = p.clamp_min(1e-12).log().flatten(0, 1)                      # (groups * images, classes)
        nll = F.nll_loss(log_p, y.repeat(groups), reduction="none").view(groups, -1).mean(1)
        std = acc.std().item() if groups > 1 else 0.0
        result["ensemble"][str(m)] = dict(mean=acc.mean().item(), std=std, draws=groups)
        result["nll"][str(m)] = nll.mean().item()
        result["ece"][str(m)] = sum(expected_calibration_error(p[j], y) for j in range(groups)) / groups
    if n_networks > 1:
        result["disagreement"] = disagreement(probs[:100])
    return result


# Table 2 of the paper (PAPER.md 5.1): HyperGAN's rows, accuracy in %.
PAPER_TABLE2 = {
    "mnist": {"1": "98.64 ± .3", "5": "98.75 ± .3", "10": "99.22 ± .09", "100": "99.31 ± .02"},
    "mnist5000": {"1": "96.69 ± .3", "5": "97.24 ± .14", "10": "97.33 ± .1", "100": "97.71 ± .05"},
    "cifar5": {"1": "84.50 ± .6", "5": "85.51 ± .2", "10": "85.54 ± .2", "100": "85.81 ± .02"},
    "cifar10": {"1": "76.32 ± .3", "5": "76.84 ± .1", "10": "77.52 ± .09", "100": "77.71 ± .03"},
}


def format_table(dataset, result):
    paper = PAPER_TABLE2.get(dataset, {})
    lines = [f"{'networks':>9} | {'ours, accuracy %':>20} | {'NLL':>7} | {'ECE':>7} | paper (Table 2)"]
    for m, r in result["ensemble"].items():
        if r is None:
            lines.append(f"{m:>9} | {'(too few networks)':>20} | {'':>7} | {'':>7} | {paper.get(m, '-')}")
            continue
        ours = (f"{100 * result['single_mean']:.2f} ± {100 * result['single_std']:.2f}" if m == "1"
                else f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}")
        lines.append(f"{m:>9} | {ours:>20} | {result['nll'][m]:7.4f} | {result['ece'][m]:7.4f} | {paper.get(m, '-')}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# 7. Checkpoints (one dict: models, optimisers, scheduler, RNG, epoch, config, history) and export.
# ---------------------------------------------------------------------------------------------
def save_checkpoint(path, cfg, model, D, state):
    """Atomic: write to a temporary file, then rename over the old one. An interrupted run can
    leave a stray .tmp file but never a half-written checkpoint."""
    opt_qg, opt_d = state["opts"]
    ckpt = dict(config=dataclasses.asdict(cfg), model=model.state_dict(), D=D.state_dict(), opt_qg=opt_qg.state_dict(),
                opt_d=opt_d.state_dict(), sched=state["sched"].state_dict(), epoch=state["epoch"],
                steps=state["steps"], seconds=state["seconds"], best_val=state["best_val"],
                history=state["history"], rng_cpu=torch.get_rng_state(),
                rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    ckpt["config"]["export"] = list(ckpt["config"]["export"])
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path!r}; train first or pass --checkpoint PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(ckpt, dict) and {"config", "model", "D", "epoch"} <= ckpt.keys()
    except Exception as e:
        raise UserError(f"{path!r} is not a readable HyperGAN checkpoint ({type(e).__name__}); "
                        f"it may be truncated or from another program")
    return ckpt


ARCH_FIELDS = ("dataset", "s_dim", "d_dim", "hidden")  # must match to load a checkpoint
TRAINING_FIELDS = ("seed", "epochs", "networks_per_step", "images_per_network", "lr", "lr_d", "beta",
                   "init_spread", "pretrain_steps", "val_size")


def restore(ckpt, cfg, model, D, state, path):
    """Loads a checkpoint into model (and training state). The architecture must match."""
    for k in ARCH_FIELDS:
        if ckpt["config"].get(k) != getattr(cfg, k):
            raise UserError(f"{path!r} was trained with --{k.replace('_', '-')} {ckpt['config'].get(k)}, "
                            f"this run has {getattr(cfg, k)}; pass the same value")
    try:
        model.load_state_dict(ckpt["model"])
        D.load_state_dict(ckpt["D"])
        if state is not None:
            state["opts"][0].load_state_dict(ckpt["opt_qg"])
            state["opts"][1].load_state_dict(ckpt["opt_d"])
            state["sched"].load_state_dict(ckpt["sched"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"{path!r} does not match this model ({str(e).splitlines()[0]})")
    if state is not None:
        for k in ("epoch", "steps", "seconds", "best_val", "history"):
            state[k] = ckpt[k]
        torch.set_rng_state(ckpt["rng_cpu"])
        if ckpt["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng_cuda"][:torch.cuda.device_count()])


def export_networks(model, net, n, path, seed):
    """Writes n sampled networks as path/net_000.pt, ...: plain state_dicts of the target network,
    loadable with e.g. small_net().load_state_dict(torch.load(p)) without the hypernetwork."""
    os.makedirs(path, exist_ok=True)
    model.eval()
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        theta = model.generate(model.codes(model.sample_s(n, g)))
    for k in range(n):
        torch.save(theta_to_state_dict(net, theta, k), os.path.join(path, f"net_{k:03d}.pt"))


# ---------------------------------------------------------------------------------------------
# 8. Optional: several GPUs or machines with torchrun, through PyTorch's DistributedDataParallel.
#        torchrun --nproc_per_node=N hypergan.py --dataset cifar10
#    Each process samples its own networks (its own noise s) on its own shard of every batch;
#    DDP averages the gradients of Q, every G_i and D across processes inside backward(), so all
#    processes hold the same parameters after every step. Rank 0 alone logs, validates, evaluates
#    and writes files. A plain `python hypergan.py` never enters this section.
# ---------------------------------------------------------------------------------------------
def init_distributed(device):
    """Returns (rank, world_size, device); joins the process group only when torchrun started us:
    NCCL between GPUs (one per process), gloo between CPU processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, device
    import torch.distributed as dist
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def wrap_distributed(model, D, device):
    """(model, D) in DistributedDataParallel; wrapping copies rank 0's parameters to all."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device] if device.type == "cuda" else None
    return DDP(model, device_ids=ids), DDP(D, device_ids=ids)


def parameter_checksum(*modules):
    return sum(p.double().sum().item() for m in modules for p in m.parameters())


# ---------------------------------------------------------------------------------------------
# 9. Main: train (or resume), select the best epoch on validation, evaluate on test, write results.
# ---------------------------------------------------------------------------------------------
def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource  # Unix only
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS: bytes, Linux: KiB


def run(cfg):
    rank, world, device = init_distributed(pick_device(cfg.device))
    set_seed(cfg.seed)
    ckpt_path = cfg.checkpoint or os.path.join(cfg.out_dir, "checkpoint.pt")
    if cfg.eval_only and not cfg.checkpoint:
        raise UserError("--eval-only needs --checkpoint PATH")
    ckpt = load_checkpoint(ckpt_path) if (cfg.eval_only or cfg.resume) else None
    data = load_data(cfg, device)
    net = TARGETS[data["arch"]](data["num_classes"]).to(device)
    model = HyperGAN(net, cfg.s_dim, cfg.d_dim, cfg.hidden, cfg.init_spread).to(device)
    D = discriminator(cfg.d_dim, cfg.hidden).to(device)
    os.makedirs(cfg.out_dir, exist_ok=True)
    log = print if rank == 0 else (lambda *a, **k: None)
    log(f"HyperGAN on {cfg.dataset} ({len(data['train'][0])} train / {len(data['val'][0])} val / "
        f"{len(data['test'][0])} test images), target '{data['arch']}', device {device}"
        + (f" x {world} processes" if world > 1 else "") + f", "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters in Q and G")
    if cfg.eval_only:
        restore(ckpt, cfg, model, D, None, ckpt_path)
        for k in TRAINING_FIELDS:  # results.json reports how the checkpoint was trained
            setattr(cfg, k, ckpt["config"][k])
        train_seconds, steps = ckpt["seconds"], ckpt["steps"]
    else:
        total_steps = len(data["train"][0]) // (cfg.networks_per_step * cfg.images_per_network * world) * cfg.epochs
        opts, sched = make_optimizers(model, D, cfg, max(total_steps, 1))
        state = dict(opts=opts, sched=sched, epoch=0, steps=0, seconds=0.0, best_val=-1.0, history=[])
        if ckpt is not None:
            restore(ckpt, cfg, model, D, state, ckpt_path)
            log(f"resumed from {ckpt_path} after epoch {state['epoch']}")
        else:
            loss = pretrain_mixer(model, cfg.pretrain_steps)
            if loss is not None:
                log(f"mixer pre-training: {cfg.pretrain_steps} steps, moment-matching loss {loss:.4f}")
        ddp = None
        if world > 1:
            ddp = wrap_distributed(model, D, device)
            torch.manual_seed(cfg.seed + 7919 * rank + state["epoch"])  # each process its own networks
        try:
            train(cfg, model, D, net, data, device, state, rank, world, ddp)
        except KeyboardInterrupt:
            raise UserError(f"interrupted; every finished epoch is in {cfg.out_dir}/checkpoint.pt, "
                            f"continue with --resume")
        if world > 1:
            print(f"rank {rank}/{world}: parameter checksum {parameter_checksum(model, D):.10e}", flush=True)
        train_seconds, steps = state["seconds"], state["steps"]
        best = os.path.join(cfg.out_dir, "best.pt")
        if os.path.isfile(best):  # evaluate the epoch that was best on the validation split
            model.load_state_dict(load_checkpoint(best)["model"])
    if rank != 0:                                   # under torchrun, rank 0 alone evaluates and writes
        return None
    history = ckpt["history"] if cfg.eval_only else state["history"]
    t0 = time.perf_counter()
    result = evaluate(model, net, *data["test"], cfg.eval_networks, seed=cfg.eval_seed)
    eval_seconds = time.perf_counter() - t0
    print(f"\ntest set, {cfg.eval_networks} sampled networks ({eval_seconds:.1f} s); pairwise "
          f"disagreement {100 * result.get('disagreement', 0):.2f} %\n" + format_table(cfg.dataset, result))
    K_b = cfg.networks_per_step * cfg.images_per_network * world   # network-image passes per step
    results = dict(dataset=cfg.dataset, config=dataclasses.asdict(cfg), processes=world,
                   accuracy=dict(single_mean=result["single_mean"], single_std=result["single_std"],
                                 ensemble=result["ensemble"]),
                   nll=result["nll"], ece=result["ece"], disagreement=result.get("disagreement"),
                   ensemble_gain=(result["ensemble"]["100"]["mean"] - result["single_mean"]
                                  if result["ensemble"].get("100") else None),
                   # throughput of the whole training loop, per-epoch validation included
                   train_seconds=train_seconds, steps_per_second=steps / train_seconds if train_seconds else None,
                   networks_x_images_per_second=steps * K_b / train_seconds if train_seconds else None,
                   seconds_per_epoch=train_seconds / len(history) if history else None,
                   eval_seconds=eval_seconds, peak_memory_mb=peak_memory_mb(device),
                   history=history, paper=PAPER_TABLE2.get(cfg.dataset))
    print(f"training: {results['steps_per_second'] or 0:.1f} steps/s, "
          f"{results['networks_x_images_per_second'] or 0:.0f} networks x images/s, "
          f"{results['seconds_per_epoch'] or 0:.1f} s/epoch; evaluation {eval_seconds:.1f} s; "
          f"peak memory {results['peak_memory_mb'] or 0:.0f} MB")
    with open(os.path.join(cfg.out_dir, "results.json.tmp"), "w") as f:
        json.dump(results, f, indent=1)
    os.replace(os.path.join(cfg.out_dir, "results.json.tmp"), os.path.join(cfg.out_dir, "results.json"))
    if cfg.export:
        export_networks(model, net, *cfg.export, seed=cfg.eval_seed)
        print(f"exported {cfg.export[0]} networks to {cfg.export[1]}")
    return results


def main(argv=None):
    try:
        run(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if "torch.distributed" in sys.modules and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
