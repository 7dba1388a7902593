"""HyperGAN: a generative model for diverse, performant neural networks.
Ratzlaff & Fuxin, ICML 2019, arXiv:1901.11058. One annotated file, read next to the paper.

    s ~ N(0, I) -> mixer Q -> codes z_1..z_N, one per layer of the target network F                (Fig. 1)
    theta_i = G_i(z_i): one generator per layer gives that layer's weight and bias                   (Fig. 1)
    min over Q, G of  E[CE(F(x; theta), y)] - beta * Dist(z, P)                                      Eq. (1), (2)
    Dist = -sum_i [log D(p_i) + log(1 - D(z_i))],  p_i ~ P = N(0, I)                                  Eq. (3)

Run:   python hypergan.py --dataset mnist       # downloads MNIST; --data-root DIR --no-download uses a copy
       python hypergan.py --dataset cifar10     # also mnist5000, cifar5 (Table 2) and toy (the 1D regression)
       python hypergan.py --dataset mnist0-4 --ood mnist5-9,noise --adversarial      # uncertainty
       python hypergan.py --method ensemble     # baselines: ensemble, dropout; ablations: --beta 0, --no-mixer
Test:  python -m pytest -q test_hypergan.py
Table 2, test accuracy % of 1 / 5 / 10 / 100 sampled networks, mean of 3 seeds: ours on a 2-core AMD EPYC CPU, torch
2.14.1, 6.6-7.4 min a run, and on one H200 GPU, 98 s (each seed, the commands, all other results: paper_notes.md).
    MNIST       CPU 99.29/99.34/99.35/99.35, H200 99.31/99.36/99.37/99.38; paper 98.64/98.75/99.22/99.31
    MNIST-5000  CPU 98.76/98.95/98.97/98.99, H200 98.72/98.93/98.96/98.97; paper 96.69/97.24/97.33/97.71
    Diversity: 100 networks gain +0.07 over one on MNIST, the paper +0.67; README.md, "Diversity", says why.
    CIFAR-10, CIFAR-5: not measured (no copy of CIFAR-10 could be reached).
K: networks sampled a step; b: images per network a step; N: target layers; d: size of a code z_i.
"""
import argparse
import contextlib
import copy
import glob
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# 1. Configuration: plain argparse; RECIPES holds what differs between data sets, and --help prints it =============
# "Deviation (row N)": a departure from the paper or the official code; paper_notes.md, row N, says why.
RECIPES = {  # epochs, K networks a step, b images each (row 6), image shift (CIFAR: official; MNIST: row 17)
    "mnist":             dict(epochs=20, networks_per_step=16, images_per_network=8, shift=2, init_spread=0.1),
    "mnist5000":         dict(epochs=60, networks_per_step=16, images_per_network=8, shift=2, init_spread=0.1),
    "mnist0-4":          dict(epochs=20, networks_per_step=16, images_per_network=8, shift=2, init_spread=0.1),
    "cifar10":           dict(epochs=60, networks_per_step=16, images_per_network=8, shift=4, init_spread=0.1),
    "cifar5":            dict(epochs=60, networks_per_step=16, images_per_network=8, shift=4, init_spread=0.1),
    "synthetic-mnist":   dict(epochs=3, networks_per_step=8, images_per_network=8, shift=2, init_spread=0.1),
    "synthetic-cifar10": dict(epochs=3, networks_per_step=8, images_per_network=8, shift=4, init_spread=0.1),
    "toy":               dict(epochs=2000, networks_per_step=32, images_per_network=20, shift=0, init_spread=1.0)}
METHOD_RECIPES = {"ensemble": dict(networks_per_step=10, images_per_network=32),    # 10 networks, 32 images each
                  "dropout": dict(networks_per_step=16, images_per_network=8)}     # one network, 16 x 8 masks
OOD_SETS = ("mnist5-9", "fashionmnist", "kmnist", "notmnist", "cifar5-9", "svhn", "noise")
S_DIM, D_DIM, PRETRAIN_STEPS = 256, 128, 100  # noise s, each code z_i (official V1 MNIST); mixer pre-training steps
VAL_SIZE, VAL_NETWORKS = 5000, 10    # training images held out to pick the best epoch (synthetic: 512); networks
EVAL_SEED, DROPOUT = 1234, 0.2       # the noise of evaluated networks, the same for every checkpoint; MC dropout p
UQ_NETWORKS, ADV_IMAGES, PGD_STEPS = 10, 1000, 10  # ensemble of OOD and attacks, images attacked, PGD iterations
EPSILONS = (0.01, 0.03, 0.08, 0.1, 0.3)            # attack sizes, L-inf in [0, 1] pixel units
CHECKPOINT_FORMAT = 4

class UserError(Exception):
    """Bad input or a failed run: main prints it as one `error:` line and exits with code 2."""

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise UserError(f"{message} (see --help)")

def parse_args(argv=None):
    recipe = lambda key: " (default: " + ", ".join(f"{r[key]} for {name}" for name, r in RECIPES.items()) + "".join(
        f"; {r[key]} for --method {m}" for m, r in METHOD_RECIPES.items() if key in r) + ")"
    p = ArgumentParser(description="HyperGAN (Ratzlaff & Fuxin, ICML 2019): train, evaluate, export.")
    a = p.add_argument
    a("--dataset", default="mnist", choices=list(RECIPES), help="mnist0-4: for --ood mnist5-9; synthetic-*: offline")
    a("--method", default="hypergan", choices=["hypergan", *METHOD_RECIPES], help="or a baseline (Table 2)")
    a("--data-root", default="./data", help="folder that holds (or receives) the data sets (default: ./data)")
    a("--no-download", dest="download", action="store_false", help="use --data-root as it is, never download")
    a("--out-dir", default="", help="a folder free of other runs' files (default: runs/DATASET-METHOD)")
    a("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="auto: cuda, then mps, then cpu")
    a("--seed", type=int, default=0, help="seed of training (default: 0)")
    a("--resume", action="store_true", help="continue the run in --out-dir (same options; --epochs may grow)")
    a("--eval-only", action="store_true", help="evaluate --checkpoint, no training")
    a("--checkpoint", default="", help="the checkpoint that --eval-only evaluates")
    a("--export", nargs=2, metavar=("N", "PATH"), help="write N sampled networks as state_dicts into folder PATH")
    a("--synthetic-size", type=int, default=4096, help="training images of the synthetic sets (default: 4096)")
    a("--epochs", type=int, help="passes over the training set" + recipe("epochs"))
    a("--networks-per-step", type=int, help="K, networks sampled a step" + recipe("networks_per_step"))
    a("--images-per-network", type=int, help="b, images each network sees a step" + recipe("images_per_network"))
    a("--shift", type=int, help="images move up to this many pixels each way (CIFAR: and flip)" + recipe("shift"))
    a("--init-spread", type=float, help="initial spread around the mean network (row 3)" + recipe("init_spread"))
    a("--lr", type=float, default=1e-3, help="Adam rate of Q and the G_i, cosine-decayed to 0 (default: 1e-3)")
    a("--lr-d", type=float, default=1e-3, help="Adam rate of D (default: 1e-3; official code: 1e-4)")
    a("--beta", type=float, default=1.0, help="weight of Eq. (3) in Eq. (2); 0: the no-D ablation (default: 1)")
    a("--hidden", type=int, default=256, help="width of Q, the G_i and D (default: 256; official: 512, row 4)")
    a("--no-mixer", dest="mixer", action="store_false", help="ablation (Fig. 7, row 29): no Q, each z_i ~ N(0, I)")
    a("--repulsion", type=float, default=0.0, help="beyond the paper: weight of `repulsion` in Eq. (2) (default: 0)")
    a("--eval-networks", type=int, default=300, help="networks sampled on the test set (default: 300)")
    a("--ood", default="", help="out-of-distribution sets, comma-separated: " + ", ".join(OOD_SETS))
    a("--adversarial", action="store_true", help="FGSM and PGD attacks, detected by the ensemble's entropy")
    a("--no-figures", dest="figures", action="store_false", help="draw no PNG figures")
    cfg = p.parse_args(argv)
    for key, value in {**RECIPES[cfg.dataset], **METHOD_RECIPES.get(cfg.method, {})}.items():
        setattr(cfg, key, value if getattr(cfg, key) is None else getattr(cfg, key))
    cfg.out_dir, cfg.ood = cfg.out_dir or f"runs/{cfg.dataset}-{cfg.method}", [o for o in cfg.ood.split(",") if o]
    limits = dict(seed=(0, 2**63 - 1), synthetic_size=(64, 10**6), epochs=(1, 10**6), networks_per_step=(2, 4096),
                  images_per_network=(1, 4096), shift=(0, 8), init_spread=(0, 1e3), lr=(1e-12, 1), lr_d=(1e-12, 1),
                  beta=(0, 1e4), repulsion=(0, 1e4), hidden=(2, 4096), eval_networks=(1, 10**5))
    for key, (low, high) in limits.items():         # K >= 2: Q and the G_i hold BatchNorm
        if not (math.isfinite(getattr(cfg, key)) and low <= getattr(cfg, key) <= high):
            raise UserError(f"--{key.replace('_', '-')} must be from {low} to {high}, got {getattr(cfg, key)}")
    if cfg.repulsion and (cfg.method != "hypergan" or cfg.dataset == "toy"):
        raise UserError("--repulsion needs --method hypergan and a classification data set (not toy)")
    for name in set(cfg.ood) - set(OOD_SETS):
        raise UserError(f"unknown --ood set {name!r}; choose from {', '.join(OOD_SETS)}")
    if cfg.export and not (cfg.export[0].isdigit() and 1 <= int(cfg.export[0]) <= 10**5):
        raise UserError(f"--export N PATH needs a number of networks from 1 to 100000, got {cfg.export[0]!r}")
    cfg.export = cfg.export and [int(cfg.export[0]), cfg.export[1]]
    return cfg

def progress(name, total, every=10.0):
    """A callback for a long phase: prints 'name: done/total, elapsed, ETA' at most every `every` seconds."""
    start, last = time.perf_counter(), [time.perf_counter()]
    def report(done):
        if time.perf_counter() - last[0] >= every and 0 < done < total:
            last[0], spent = time.perf_counter(), time.perf_counter() - start
            print(f"  {name}: {done}/{total}, {spent:.0f} s, ETA {spent * (total / done - 1):.0f} s", flush=True)
    return report

# 2. Data: each split one normalised tensor on the device, batches by indexing, augmentation in batch: no DataLoader
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)                                # official code
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # official code

def synthetic_split(shape, n, seed):
    """Offline stand-in data (row 31): each image is its class's fixed pattern, moved by up to 2 pixels, plus noise."""
    C, H, W = shape
    patterns = F.interpolate(torch.randn(10, C, H // 4, W // 4, generator=torch.Generator().manual_seed(0)),
                             size=(H, W), mode="bilinear")                       # the same classes in every split
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(10, (n,), generator=g)
    x = torch.stack([torch.roll(patterns[c], shifts=(int(sy), int(sx)), dims=(1, 2))
                     for c, sy, sx in zip(y.tolist(), *torch.randint(-2, 3, (2, n), generator=g))])
    return ((x + 0.8 * torch.randn(n, C, H, W, generator=g)) / 6 + 0.5).clamp(0, 1), y

def torchvision_split(name, root, train, download):
    """Images (n, C, H, W) in [0, 1] and labels of a torchvision data set; any failure is one UserError."""
    import torchvision.datasets as sets
    cls = getattr(sets, {"fashionmnist": "FashionMNIST", "kmnist": "KMNIST"}.get(name, name.upper()))
    try:
        ds = cls(root, **(dict(split="train" if train else "test") if name == "svhn" else dict(train=train)),
                 download=download)
        x, y = torch.as_tensor(ds.data), torch.as_tensor(ds.labels if name == "svhn" else ds.targets).long()
        x = x.unsqueeze(1) if x.dim() == 3 else x if name == "svhn" else x.permute(0, 3, 1, 2)   # (n, C, H, W)
        assert len(x) == len(y) > 0, "images and labels do not match"
    except Exception as e:  # offline, a failed download, a corrupt or truncated file, scipy missing for SVHN
        raise UserError(f"could not load {name} from {root!r} ({e!r:.100}); "
                        + ("check the network or the files" if download else "--no-download needs the files there"))
    return x.float().div(255), y

def load_ood(name, cfg, data, held_out):
    """OOD set `name`, normalised; notMNIST: <data-root>/notMNIST_small/<letter>/*.png (None if absent; row 25)."""
    shape = tuple(data["test"][0].shape[1:])
    need = dict(fashionmnist=(1, 28, 28), kmnist=(1, 28, 28), notmnist=(1, 28, 28), svhn=(3, 32, 32)).get(name, shape)
    home = {"mnist5-9": "mnist0-4", "cifar5-9": "cifar5"}.get(name, cfg.dataset)
    if home != cfg.dataset or need != shape:
        raise UserError(f"--ood {name} needs --dataset {home}" if home != cfg.dataset else
                        f"--ood {name} holds {need} images, --dataset {cfg.dataset} has {shape}")
    if name == "notmnist":
        from torchvision.io import ImageReadMode, decode_image
        x = []
        for path in sorted(glob.glob(os.path.join(cfg.data_root, "notMNIST_small", "*", "*"))):
            with contextlib.suppress(RuntimeError, OSError):                  # the archive has unreadable files
                x.append(decode_image(path, ImageReadMode.GRAY).view(1, 28, 28).float() / 255)
        x = torch.stack(x) if x else None
    elif name == "noise":                                        # uniform random pixels, as many as the test set
        x = torch.rand(len(data["test"][0]), *shape, generator=torch.Generator().manual_seed(3))
    else:
        x = held_out if name.endswith("5-9") else torchvision_split(name, cfg.data_root, False, cfg.download)[0]
    return None if x is None else data["normalise"](x)

def load_data(cfg, device):
    """Splits and OOD sets. Deviation (row 10): a fixed split of the training images picks the best epoch."""
    if cfg.dataset.startswith("synthetic"):
        shape = (1, 28, 28) if cfg.dataset == "synthetic-mnist" else (3, 32, 32)
        (x, y), (x_test, y_test) = [synthetic_split(shape, n, seed) for n, seed in
                                    ((cfg.synthetic_size, 1), (max(1024, cfg.synthetic_size // 5), 2))]
        mean, std, val_size = (0.5,) * shape[0], (1 / 6,) * shape[0], 512
    else:
        base = "mnist" if cfg.dataset.startswith("mnist") else "cifar10"
        (x, y), (x_test, y_test) = [torchvision_split(base, cfg.data_root, train, cfg.download) for train in (1, 0)]
        (mean, std), val_size = (MNIST_MEAN, MNIST_STD) if base == "mnist" else (CIFAR_MEAN, CIFAR_STD), VAL_SIZE
    num_classes, held_out = 10, x_test[y_test >= 5]
    if cfg.dataset in ("cifar5", "mnist0-4"):           # CIFAR-5: the first five classes (row 19)
        x, y, x_test, y_test, num_classes = x[y < 5], y[y < 5], x_test[y_test < 5], y_test[y_test < 5], 5
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))      # MNIST-5000: Deviation (row 11)
    val, train = order[:val_size], order[val_size:][:5000 if cfg.dataset == "mnist5000" else None]
    mean, std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)             # (C, 1, 1)
    norm = lambda t: ((t - mean) / std).to(device)
    data = dict(train=(norm(x[train]), y[train].to(device)), val=(norm(x[val]), y[val].to(device)),
                test=(norm(x_test), y_test.to(device)), num_classes=num_classes, flip=x.shape[1] == 3,
                arch="small" if x.shape[1] == 1 else "mednet", black=norm(torch.zeros(1, 1, 1)),
                mean=mean.to(device), std=std.to(device), normalise=norm, ood={}, ood_skipped={})
    for name in cfg.ood:                                # loaded before training: a missing set fails in seconds
        x_ood = load_ood(name, cfg, data, held_out)
        if x_ood is None:                               # only notMNIST is optional
            data["ood_skipped"][name] = dict(skipped=f"no readable images in {cfg.data_root}/notMNIST_small")
            print(f"ood {name}: skipped, {data['ood_skipped'][name]['skipped']} (unpack notMNIST_small.tar.gz there)")
        else:
            data["ood"][name] = x_ood
    return data

def augment_batch(x, black, shift, flip, generator=None):
    """Images x (B, C, H, W) move by up to `shift` pixels on a black border; `flip` mirrors half of them."""
    (B, C, H, W), ar = x.shape, lambda n: torch.arange(n, device=x.device)
    padded = F.pad(x - black, (shift,) * 4) + black                              # (B, C, H + 2 shift, W + 2 shift)
    dy, dx = torch.randint(0, 2 * shift + 1, (2, B, 1), device=x.device, generator=generator)
    rows, cols = (dy + ar(H))[:, None, :, None], (dx + ar(W))[:, None, None, :]   # (B, 1, H, 1), (B, 1, 1, W)
    x = padded[ar(B)[:, None, None, None], ar(C)[:, None, None], rows, cols]      # each image its own crop
    if flip:
        x = torch.where(torch.rand(B, 1, 1, 1, device=x.device, generator=generator) < 0.5, x.flip(-1), x)
    return x

# 3. Target networks F(x; theta) (PAPER.md 3): plain nn.Sequential models; functional_forward runs K at once ========
def small_net(num_classes=10, p=0.0):
    """MNIST target (official code). Deviation (row 14, exact): pooling first; p > 0: dropout (MC dropout)."""
    drop = [nn.Dropout(p)] if p else []
    return nn.Sequential(nn.Conv2d(1, 32, 5), nn.MaxPool2d(2), nn.LeakyReLU(0.01), *drop,      # (B, 32, 12, 12)
                         nn.Conv2d(32, 32, 5), nn.MaxPool2d(2), nn.LeakyReLU(0.01), *drop,     # (B, 32, 4, 4)
                         nn.Flatten(), nn.Linear(512, num_classes))

def mednet(num_classes=10, p=0.0):
    """CIFAR target of the paper's time (official V1 'mednet', row 18): conv 16/32/32 3x3, each pooled; 128-64."""
    drop = [nn.Dropout(p)] if p else []
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.MaxPool2d(2), nn.ReLU(), *drop,               # (B, 16, 15, 15)
                         nn.Conv2d(16, 32, 3), nn.MaxPool2d(2), nn.ReLU(), *drop,              # (B, 32, 6, 6)
                         nn.Conv2d(32, 32, 3), nn.MaxPool2d(2), nn.ReLU(), *drop,              # (B, 32, 2, 2)
                         nn.Flatten(), nn.Linear(128, 64), nn.ReLU(), *drop, nn.Linear(64, num_classes))

def toy_net(num_classes=1, p=0.0):                                  # the 1D toy's target (official V1)
    return nn.Sequential(nn.Linear(1, 200), nn.ELU(), *([nn.Dropout(p)] if p else []), nn.Linear(200, 1))

TARGETS = {"small": small_net, "mednet": mednet, "toy": toy_net}

def param_layers(net):
    return [m for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]     # in order: layer i gets generator G_i

def functional_forward(net, theta, x):
    """Run K copies of `net`, copy k with theta = [(weight_i[k], bias_i[k]) for each layer i], on x (K, B, C, H, W),
    network k on its images x[k], or on x (B, C, H, W) shared by all. Returns (K, B, classes). The K networks' maps
    are stacked on the channel axis, (B, K*C, H, W), and one convolution with groups=K applies each network's
    filters to its own block; pooling and activations act per channel. Dropout layers (MC dropout) stay on."""
    K, h, params = theta[0][0].shape[0], x, iter(theta)
    if x.dim() == 5:    # (K, B, C, H, W) -> (B, K*C, H, W), channels-last: the layout conv and pooling read fastest
        h = x.transpose(0, 1).flatten(1, 2).contiguous(memory_format=torch.channels_last)
    for layer in net:
        if isinstance(layer, nn.Conv2d):
            weight, bias = next(params)                                         # (K, O, C, kh, kw), (K, O)
            if h.shape[1] == K * layer.in_channels:                             # network k's channels: block k
                h = F.conv2d(h, weight.flatten(0, 1), bias.flatten(), layer.stride, layer.padding, groups=K)
            else:   # x shared by all K (stride 1, no padding): one matmul of its patches with all K*O filters
                (B, _, H, W), (kh, kw) = h.shape, weight.shape[-2:]
                patches = F.unfold(h, (kh, kw)).transpose(1, 2).flatten(0, 1)                # (B H' W', C kh kw)
                h = torch.addmm(bias.flatten(), patches, weight.flatten(0, 1).flatten(1).t())  # (B H' W', K O)
                h = h.view(B, H - kh + 1, W - kw + 1, -1).permute(0, 3, 1, 2)                # (B, K O, H', W')
        elif isinstance(layer, nn.Flatten):
            h = h.unflatten(1, (K, -1)).flatten(2).transpose(0, 1)             # (B, K*C, H, W) -> (K, B, C*H*W)
        elif isinstance(layer, nn.Linear):
            weight, bias = next(params)                                         # (K, O, I), (K, O)
            h = torch.baddbmm(bias.unsqueeze(1), h.expand(K, *h.shape[-2:]), weight.transpose(1, 2))  # (K, B, O)
        elif isinstance(layer, nn.Dropout):                                     # MC dropout, on at test time too:
            h = F.dropout(h, layer.p, training=True)                            # a mask per network and image
        else:
            h = layer(h)                                                        # activation or pooling
    return h

# 4. The hypernetwork (Fig. 1; PAPER.md 1.1, 2): the mixer Q, the generators G_1..G_N and the discriminator D ======
def mlp(sizes, act, batchnorm=True):   # Linear layers, BatchNorm and an activation between them
    layers = []
    for n_in, n_out in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(n_in, n_out), *([nn.BatchNorm1d(n_out)] if batchnorm else []), act()]
    return nn.Sequential(*layers, nn.Linear(sizes[-2], sizes[-1]))

class HyperGAN(nn.Module):
    """Q: s (K, S_DIM) -> z (K, N, D_DIM), Linear-BN-ReLU x2, Linear (official; Deviation (row 15): no N(0, 0.01^2)
    noise on s). G_i: z_i -> theta_i, Linear-BN-ELU x2, Linear (official MNIST code). `net`: freshly initialised."""
    max_networks = math.inf
    def __init__(self, net, hidden=256, init_spread=0.1, mixer=True):
        super().__init__()
        self.shapes = [(m.weight.shape, m.bias.shape) for m in param_layers(net)]
        self.Q = mlp([S_DIM, hidden, hidden, len(self.shapes) * D_DIM], nn.ReLU) if mixer else nn.Identity()
        self.s_dim = S_DIM if mixer else len(self.shapes) * D_DIM   # no mixer: s is the N independent codes z_i
        # Deviation (row 2): the biases are generated too (2019 code), so G_i outputs weight_i and bias_i.
        self.G = nn.ModuleList(mlp([D_DIM, hidden, hidden, w.numel() + b.numel()], nn.ELU) for w, b in self.shapes)
        # Deviation (row 3): G_i's last layer is theta_i = bias + scale_i * (W h), scale_i = 1/sqrt(fan_in) of layer
        # i: the bias starts as the target's default init (a mean network), W h at init_spread x the init scale.
        self.scales = [1 / math.sqrt(w[1:].numel()) for w, _ in self.shapes]
        with torch.no_grad():
            for G, layer in zip(self.G, param_layers(net)):
                G[-1].bias.copy_(torch.cat([layer.weight.flatten(), layer.bias]))
                G[-1].weight.mul_(init_spread)
    def sample_s(self, K, generator=None):
        return torch.randn(K, self.s_dim, device=self.G[0][0].weight.device, generator=generator)  # s ~ N(0, I)
    def codes(self, s):
        return self.Q(s).view(len(s), len(self.shapes), D_DIM)                     # z = Q(s): (K, N, d)
    def generate(self, z):
        """theta_i = G_i(z_i) for every layer i: [(weight (K, *shape), bias (K, out)) for each layer]."""
        theta = []
        for i, (G, (w, b)) in enumerate(zip(self.G, self.shapes)):
            out = F.linear(G[:-1](z[:, i]), G[-1].weight) * self.scales[i] + G[-1].bias   # (K, |w| + |b|)
            theta.append((out[:, :w.numel()].view(-1, *w), out[:, w.numel():]))
        return theta
    def forward(self, s):
        z = self.codes(s)
        return z, self.generate(z)
    def sample(self, n, generator=None, first=0):   # theta of n new networks (`first`: for the standard ensemble)
        return self.generate(self.codes(self.sample_s(n, generator)))

def discriminator(hidden=256):
    """D: a layer code (.., d) -> a logit; the paper's D(x) is sigmoid(logit). One D for all N codes (Fig. 1)."""
    return mlp([D_DIM, hidden, hidden, 1], nn.ReLU, batchnorm=False)

# 5. The objective (PAPER.md 1.2). D returns logits l: log D = logsigmoid(l), log(1 - D) = logsigmoid(-l) =========
def classification_loss(out, y):
    """Cross-entropy of every network on its own images, out: (K, b, classes), y: (K, b); and the accuracy."""
    # Eq. (1): E_s E_(x, y) L(F(x; G(Q(s))), y), estimated on K networks x b images (a mean: row 8)
    return F.cross_entropy(out.flatten(0, 1).float(), y.flatten()), (out.argmax(-1) == y).float().mean()

def discriminator_loss(D, z, p):
    """D minimises Eq. (3) as written (row 1): D(prior) -> 1, D(codes) -> 0. z, p: (K, N, d); one D call (DDP)."""
    logit_p, logit_z = D(torch.cat([p, z])).squeeze(-1).chunk(2)                      # (K, N) each
    # Eq. (3): Dist = -sum_i [ log D(p_i) + log(1 - D(z_i)) ]
    return -(F.logsigmoid(logit_p) + F.logsigmoid(-logit_z)).sum(1).mean()

def code_distance(D, z):
    """Q's share of Eq. (3), the terms that depend on the codes: Dist_z = -sum_i log(1 - D(z_i)), mean over K."""
    return -F.logsigmoid(-D(z).squeeze(-1)).sum(1).mean()

def pretrain_mixer(model, steps=PRETRAIN_STEPS, batch=1000):
    """Before training (official README: on), fit Q so that each code z_i has mean 0 and covariance I on a batch.
    Deviation (row 16): the exact moments 0 and I, not those of a sampled N(0, I) batch. Returns the last loss."""
    device = model.G[0][0].weight.device
    optimizer, eye = torch.optim.Adam(model.Q.parameters(), lr=1e-3), torch.eye(D_DIM, device=device)
    for _ in range(steps):
        z = model.codes(model.sample_s(batch)).transpose(0, 1)                         # (N, batch, d)
        mean = z.mean(1)                                                               # (N, d)
        cov = (z - mean[:, None]).transpose(1, 2) @ (z - mean[:, None]) / (batch - 1)  # (N, d, d)
        loss = mean.pow(2).mean() + (cov - eye).pow(2).mean()
        descend(optimizer, loss)
    return loss.item()

def descend(optimizer, loss):
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

# 6. Training: a step is one D update on Eq. (3), then one Q and G update on Eq. (2), 1:1 as the official code ====
STATS = ("ce", "d_loss", "q_adv", "D(p)", "D(z)", "acc")       # q_adv = -Dist_z, the adversarial term Q minimises

def repulsion(logits):
    """Beyond the paper (row 32; the authors' 2020 successor): the mean RBF kernel exp(-|f_i - f_j|^2 / h) over pairs
    i != j of the K networks' logits f on one shared batch, h = median |f_i - f_j|^2 / log K; small when they differ."""
    f = logits.float().flatten(1)                                        # (K, b * classes)
    d2 = torch.cdist(f, f).pow(2)[~torch.eye(len(f), dtype=torch.bool, device=f.device)]
    return torch.exp(-d2 / (d2.median().detach() / math.log(len(f)) + 1e-8)).mean()

def train_step(model, D, net, opts, x, y, beta, task_loss=classification_loss, rep_weight=0.0):
    """x: (K, b, C, H, W), network k on its images x[k]; y: (K, b). Returns STATS as a tensor, without a host sync
    (the baselines, D None: Eq. (1) alone, (ce, acc)). Under torchrun model and D are DDP wrappers (section 12)."""
    opt_g, opt_d = opts
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda)
    if D is None:
        with autocast:
            out = functional_forward(net, model(len(x)), x)              # the ensemble's members, or dropout masks
        ce, acc = task_loss(out, y)
        descend(opt_g, ce)
        return torch.stack([ce.detach(), acc])
    hyper, D_alone = getattr(model, "module", model), getattr(D, "module", D)
    with autocast:
        z, theta = model(hyper.sample_s(len(x)))                         # s ~ N(0, I): codes (K, N, d), theta
    z = z.float()
    # D step: minimise Eq. (3) over D; the codes are constants here.
    p = torch.randn_like(z)                                              # p_i ~ P = N(0, I)
    d_loss = discriminator_loss(D, z.detach(), p)
    descend(opt_d, d_loss)
    # Q and G step, D held fixed.
    with autocast:
        out = functional_forward(net, theta, x)                          # (K, b, classes)
        rep = rep_weight * repulsion(functional_forward(net, theta, x[0])) if rep_weight else 0  # x[0]: shared
    ce, acc = task_loss(out, y)                                          # Eq. (1)
    D_alone.requires_grad_(False)
    dist_z = code_distance(D_alone, z)
    D_alone.requires_grad_(True)
    descend(opt_g, ce - beta * dist_z + rep)             # Eq. (2): min over Q, G of CE - beta Dist; rep 0 by default
    with torch.no_grad():
        Dp, Dz = torch.sigmoid(D_alone(p)).mean(), torch.sigmoid(D_alone(z)).mean()
    return torch.stack([ce.detach(), d_loss.detach(), -dist_z.detach(), Dp, Dz, acc])

def make_optimizers(model, D, cfg, total_steps):
    """Fused Adam for Q and the G_i (or a baseline's networks), and for D. Deviation (row 7): official V1, betas
    (0.5, 0.9), Q 5e-4, G 1e-4, D 1e-4, constant; ours (0.9, 0.999) at 1e-3 cosine-decayed, D (0.5, 0.999) 1e-3."""
    opt_g = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), fused=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=(0.5, 0.999), fused=True) if D else None
    cosine = lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total_steps) / total_steps))
    return (opt_g, opt_d), torch.optim.lr_scheduler.LambdaLR(opt_g, cosine)

def epoch_layout(cfg, n, world=1):
    """(steps, data orders, images per process and step): the standard ensemble's members each walk their own."""
    K, b = cfg.networks_per_step, cfg.images_per_network
    return (n // (b * world), K, b) if cfg.method == "ensemble" else (n // (K * b * world), 1, K * b)

def train(cfg, model, D, net, data, state, ddp=None, rank=0, world=1):
    """The training loop; after each epoch, checkpoint.pt holds `state` and best.pt the best epoch on validation."""
    (x_train, y_train), K, b = data["train"], cfg.networks_per_step, cfg.images_per_network
    steps, orders, per_process = epoch_layout(cfg, len(x_train), world)
    if steps == 0:
        raise UserError(f"the training set ({len(x_train)} images) is smaller than one step ({per_process * world})")
    log, names = print if rank == 0 else (lambda *a, **k: None), STATS if D is not None else ("ce", "acc")
    log(f"{'epoch':>5} {'step':>7} " + " ".join(f"{n:>8}" for n in names) + f" {'ms/step':>8} {'ETA':>7}")
    for epoch in range(state["epoch"], cfg.epochs):
        t_epoch = time.perf_counter()
        model.train()
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)      # so --resume replays the epoch exactly
        order = torch.stack([torch.randperm(len(x_train), generator=g) for _ in range(orders)]).to(x_train.device)
        sums, n_sum, t_log = 0, 0, time.perf_counter()
        for i in range(steps):
            start = (i * world + rank) * per_process                       # this process's shard of the step
            idx = order[:, start:start + per_process].reshape(K, b)        # network k: images idx[k] (row 5)
            x = x_train[idx.flatten()]
            x = augment_batch(x, data["black"], cfg.shift, data["flip"]) if cfg.shift else x
            sums = sums + train_step(*(ddp or (model, D)), net, state["opts"], x.view(K, b, *x.shape[1:]),
                                     y_train[idx], cfg.beta, rep_weight=cfg.repulsion)
            state["sched"].step()
            n_sum += 1
            if (i + 1) % max(1, steps // 5) == 0 or i + 1 == steps:
                stats = (sums / n_sum).tolist()                            # the only host sync
                if not all(map(math.isfinite, stats)):
                    raise UserError(f"a loss became non-finite at epoch {epoch + 1}, step {i + 1} "
                                    f"({dict(zip(names, stats))}); lower --lr or --beta; the checkpoint is kept")
                ms = (time.perf_counter() - t_log) * 1000 / n_sum
                log(f"{epoch + 1:>5} {epoch * steps + i + 1:>7} " + " ".join(f"{v:8.4f}" for v in stats) +
                    f" {ms:8.1f} {ms / 60000 * (steps * (cfg.epochs - epoch) - i - 1):6.1f}m", flush=True)
                sums, n_sum, t_log = 0, 0, time.perf_counter()
        state["epoch"], state["steps"] = epoch + 1, state["steps"] + steps
        if rank != 0:
            continue
        val = evaluate(model, net, *data["val"], min(VAL_NETWORKS, model.max_networks), sizes=())
        state["seconds"] += time.perf_counter() - t_epoch                 # training and validation time
        div = diversity(model, net, data["test"][0][:1000])               # observes only, chooses nothing
        state["history"].append(dict(epoch=epoch + 1, train=dict(zip(names, stats)), seconds=state["seconds"],
                                     val_single_mean=val["single_mean"], diversity=div))
        improved, state["best_val"] = val["single_mean"] > state["best_val"], max(state["best_val"], val["single_mean"])
        for name in ("checkpoint.pt", "best.pt") if improved else ("checkpoint.pt",):
            save_checkpoint(os.path.join(cfg.out_dir, name), cfg, model, D, state)
        print(f"epoch {epoch + 1}: validation {100 * val['single_mean']:.2f} ± {100 * val['single_std']:.2f} % (one "
              f"network); weight-norm RSD {div['weight_norm_rsd_mean']:.4f}; test disagreement "
              f"{100 * div['disagreement']:.2f} %" + "  -> best.pt" * improved, flush=True)

# 7. Evaluation: Table 2 (accuracy of 1, 5, 10, 100 networks) and Fig. 7 (diversity) ===============================
@torch.no_grad()
def sample_probs(model, net, x, n_networks, seed=EVAL_SEED, report=lambda done: None):
    """Softmax outputs (n_networks, len(x), classes); the same seed, the same networks (and MC dropout masks)."""
    nets, images = (10, 50) if x.device.type == "cpu" else (100, 500)    # chunks that fit a CPU's cache
    was_training, g, out = model.training, torch.Generator(x.device).manual_seed(seed), []
    model.eval()                        # Deviation (row 9): BatchNorm of Q and G in eval mode: one network alone
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        torch.manual_seed(seed)
        for k in range(0, n_networks, nets):
            theta = model.sample(min(nets, n_networks - k), g, first=k)
            out.append(torch.cat([functional_forward(net, theta, x[i:i + images]).float().softmax(-1)
                                  for i in range(0, len(x), images)], dim=1))
            report(k + len(out[-1]))
    model.train(was_training)
    return torch.cat(out)

def disagreement(probs):
    """The share of network pairs that disagree: with c_j of M voting j, (M^2 - sum c_j^2) / 2 of M (M - 1) / 2."""
    M, votes = len(probs), F.one_hot(probs.argmax(-1), probs.shape[-1]).sum(0).float()   # (images, classes)
    return ((M * M - votes.pow(2).sum(-1)) / (M * (M - 1))).mean().item()

def evaluate(model, net, x, y, n_networks, sizes=(1, 5, 10, 100), report=lambda done: None):
    """Accuracy and NLL of ensembles (mean softmax, row 12) of each size m in `sizes`: disjoint groups of m of the
    n_networks sampled, so independent draws, with mean and std over the groups (row 13; None if n_networks < m)."""
    probs = sample_probs(model, net, x, n_networks, report=report)                # (n, images, classes)
    single = (probs.argmax(-1) == y).float().mean(1)                              # (n,)
    r = dict(single_mean=single.mean().item(), single_std=single.std().item() if n_networks > 1 else 0.0,
             ensemble={}, nll={}, disagreement=disagreement(probs[:100]) if n_networks > 1 else None)
    for m, groups in ((m, n_networks // m) for m in sizes):
        r["ensemble"][str(m)] = r["nll"][str(m)] = None
        if groups:
            p = probs[:groups * m].view(groups, m, *probs.shape[1:]).mean(1)     # (groups, images, classes)
            acc = (p.argmax(-1) == y).float().mean(1)
            r["ensemble"][str(m)] = dict(mean=acc.mean().item(), std=acc.std().item() if groups > 1 else 0.0,
                                         draws=groups)
            r["nll"][str(m)] = F.nll_loss(p.clamp_min(1e-12).log().flatten(0, 1), y.repeat(groups)).item()
    return r

@torch.no_grad()
def diversity(model, net, x, n_networks=100, n_predicting=20):
    """Fig. 7: std / mean over n_networks networks of the L2 norm of layer i's weight; row 28: their disagreement."""
    was_training = model.training
    model.eval()
    theta = model.sample(min(n_networks, model.max_networks), torch.Generator(x.device).manual_seed(EVAL_SEED))
    rsd = [(v.std() / v.mean()).item() for v in (w.flatten(1).float().norm(dim=1) for w, _ in theta)]
    model.train(was_training)
    return dict(weight_norm_rsd=rsd, weight_norm_rsd_mean=sum(rsd) / len(rsd),
                disagreement=disagreement(sample_probs(model, net, x, min(n_predicting, model.max_networks))))

PAPER_TABLE2 = {  # HyperGAN's rows of the paper's Table 2 (PAPER.md 5.1), accuracy %
    "mnist": {"1": "98.64 ± .3", "5": "98.75 ± .3", "10": "99.22 ± .09", "100": "99.31 ± .02"},
    "mnist5000": {"1": "96.69 ± .3", "5": "97.24 ± .14", "10": "97.33 ± .1", "100": "97.71 ± .05"},
    "cifar5": {"1": "84.50 ± .6", "5": "85.51 ± .2", "10": "85.54 ± .2", "100": "85.81 ± .02"},
    "cifar10": {"1": "76.32 ± .3", "5": "76.84 ± .1", "10": "77.52 ± .09", "100": "77.71 ± .03"}}

# 8. The baselines of Table 2, "Random Start" and "MC Dropout" =====================================================
# Both expose HyperGAN's sample(n) -> theta, so the same train_step (D None: Eq. (1) alone) and evaluation serve.
class StandardEnsemble(nn.Module):
    """M independently initialised networks (row 20), each parameter a (M, *shape) stack; sample: first..first+n."""
    def __init__(self, net, members):
        super().__init__()
        self.max_networks, nets = members, [copy.deepcopy(net) for _ in range(members)]
        for layer in (layer for n in nets for layer in param_layers(n)):
            layer.reset_parameters()                                               # a fresh default init each
        self.params = nn.ParameterList(nn.Parameter(torch.stack(t)) for t in zip(*(n.parameters() for n in nets)))
    def sample(self, n, generator=None, first=0):
        p = [t[first:first + n] for t in self.params]
        return list(zip(p[0::2], p[1::2]))                                         # [(weight, bias)] per layer
    forward = sample

class MCDropout(nn.Module):
    """One network with dropout on at test time (Gal & Ghahramani, 2016; row 21): a sampled network is a mask."""
    max_networks = math.inf
    def __init__(self, net):
        super().__init__()
        self.params = nn.ParameterList(nn.Parameter(t.detach().clone()) for t in net.parameters())
    def sample(self, n, generator=None, first=0):
        p = [t.expand(n, *t.shape) for t in self.params]
        return list(zip(p[0::2], p[1::2]))
    forward = sample

def build(cfg, arch, num_classes, device):
    """(target network, the distribution over its parameters that this run trains, D or None for the baselines)."""
    net = TARGETS[arch](num_classes, DROPOUT if cfg.method == "dropout" else 0.0).to(device)
    if cfg.method != "hypergan":
        return net, (MCDropout(net) if cfg.method == "dropout" else StandardEnsemble(net, cfg.networks_per_step)), None
    return net, HyperGAN(net, cfg.hidden, cfg.init_spread, cfg.mixer).to(device), discriminator(cfg.hidden).to(device)

# 9. Uncertainty (PAPER.md 5.3, 5.4): OOD and adversarial detection by the entropy of 10 networks' mean softmax ====
def entropy(p):                                                                   # in nats, over the last axis
    return -(p * p.clamp_min(1e-12).log()).sum(-1)

def auroc(neg, pos):
    """P(a random positive scores above a random negative), ties counting 1/2: Mann-Whitney U, average ranks."""
    _, inverse, counts = torch.unique(torch.cat([neg, pos]).double().cpu(), return_inverse=True, return_counts=True)
    ranks = (counts.cumsum(0) - (counts - 1) / 2)[inverse]                       # 1-based; tied scores share
    return ((ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2) / (len(neg) * len(pos))).item()

def fpr_at_95_tpr(neg, pos):
    """The fraction of negatives flagged (score >= t) at the highest t that flags 95 % of the positives."""
    return (neg >= pos.sort(descending=True).values[math.ceil(0.95 * len(pos)) - 1]).float().mean().item()

def detection(neg_probs, pos_probs):
    """Detection by entropy. ecdf: the entropies at the quantiles 0, 0.01, .., 1 of each side (the paper's plot)."""
    e_in, e_out, q = entropy(neg_probs), entropy(pos_probs), torch.linspace(0, 1, 101, device=neg_probs.device)
    return dict(auroc=auroc(e_in, e_out), fpr95=fpr_at_95_tpr(e_in, e_out), entropy_in_mean=e_in.mean().item(),
                entropy_out_mean=e_out.mean().item(), n_in=len(e_in), n_out=len(e_out),
                ecdf=dict(quantiles=q.tolist(), entropy_in=e_in.quantile(q).tolist(),
                          entropy_out=e_out.quantile(q).tolist()))

def ensemble_log_probs(net, theta, x):
    """log of the ensemble's mean softmax (B, classes), differentiable in x: logsumexp_k log_softmax_k - log M."""
    log_p = functional_forward(net, theta, x).float().log_softmax(-1)              # (M, B, classes)
    return torch.logsumexp(log_p, 0) - math.log(len(log_p))

@torch.no_grad()
def ensemble_probs(net, theta, x, chunk=200):
    return torch.cat([ensemble_log_probs(net, theta, x[i:i + chunk]).exp() for i in range(0, len(x), chunk)])

def attack(net, networks_at_step, x, y, eps, steps, data, generator=None):
    """White-box L-inf attack ([0, 1] pixels) on the ensemble's NLL: each step moves the pixels by alpha along the
    gradient's sign, then clips to the eps-ball and [0, 1]. steps 1: FGSM; > 1: PGD (random start, alpha 2.5 eps /
    steps). networks_at_step(t): the networks at step t. Deviation (row 26): official, foolbox on one network."""
    pixels = x * data["std"] + data["mean"]                                        # back to [0, 1]
    adv, alpha = pixels.clone(), eps
    if steps > 1:
        noise = torch.rand(pixels.shape, device=x.device, generator=generator) * 2 - 1
        adv, alpha = (pixels + eps * noise).clamp(0, 1), 2.5 * eps / steps
    for t in range(steps):
        adv.requires_grad_(True)
        loss = F.nll_loss(ensemble_log_probs(net, networks_at_step(t), (adv - data["mean"]) / data["std"]), y)
        adv = adv.detach() + alpha * torch.autograd.grad(loss, adv)[0].sign()
        adv = torch.min(torch.max(adv, pixels - eps), pixels + eps).clamp(0, 1)
    return (adv - data["mean"]) / data["std"]

def adversarial_evaluation(model, net, theta, data, cfg, report=lambda done: None):
    """FGSM, PGD, and PGD with new networks each step (on the distribution) against theta: accuracy under attack,
    flipped answers, and detection by entropy of the flipped images among the clean correct ones (row 27)."""
    x, y = (t[:ADV_IMAGES] for t in data["test"])
    fresh_g, start_g = (torch.Generator(x.device).manual_seed(EVAL_SEED + i) for i in (1, 2))
    fresh = torch.no_grad()(lambda t: model.sample(len(theta[0][0]), fresh_g))    # new networks at every step
    clean = ensemble_probs(net, theta, x)
    correct, done, result = clean.argmax(-1) == y, 0, dict(networks=len(theta[0][0]), images=len(x))
    result.update(clean_accuracy=correct.float().mean().item(), fresh_networks_differ=cfg.method == "hypergan")
    for name, steps, at_step in (("fgsm", 1, lambda t: theta), ("pgd", PGD_STEPS, lambda t: theta),
                                 ("pgd_fresh", PGD_STEPS, fresh)):
        result[name] = {}
        for eps in EPSILONS:
            adv = [attack(net, at_step, x[i:i + 100], y[i:i + 100], eps, steps, data, start_g)    # 100 images at a
                   for i in range(0, len(x), 100)]                                                # time: bounded memory
            report(done := done + steps * math.ceil(len(x) / 100))
            p_adv = ensemble_probs(net, theta, torch.cat(adv))
            flipped = correct & (p_adv.argmax(-1) != y)
            r = result[name][str(eps)] = dict(accuracy=(p_adv.argmax(-1) == y).float().mean().item(), auroc=None,
                                              fpr95=None, success_rate=(flipped.sum() / correct.sum().clamp(1)).item())
            if flipped.any():
                d = detection(clean[correct], p_adv[flipped])
                r.update(auroc=d["auroc"], fpr95=d["fpr95"])
        print(f"  {name:9s} " + "  ".join(f"eps {e}: acc {100 * r['accuracy']:5.1f} % auroc " + ("  -  " if
              r["auroc"] is None else f"{r['auroc']:.3f}") for e, r in result[name].items()), flush=True)
    return result

def uncertainty_evaluation(model, net, data, cfg):
    """OOD detection for every --ood set and, with --adversarial, the attacks: all with one ensemble (rows 22-24)."""
    x_test, out = data["test"][0], {}
    with torch.random.fork_rng(devices=[x_test.device] if x_test.is_cuda else []):
        torch.manual_seed(EVAL_SEED)                                               # MC dropout's masks
        with torch.no_grad():
            g = torch.Generator(x_test.device).manual_seed(EVAL_SEED)
            theta = model.eval().sample(min(UQ_NETWORKS, model.max_networks), g)
        if cfg.ood:
            report = progress("ood sets", len(data["ood"]) + 1, every=5.0)
            p_in, out["ood"] = ensemble_probs(net, theta, x_test), dict(data["ood_skipped"])
        for i, (name, x_ood) in enumerate(data["ood"].items()):
            report(i + 1)
            r = out["ood"][name] = dict(detection(p_in, ensemble_probs(net, theta, x_ood)), networks=len(theta[0][0]))
            print(f"ood {name:12s} AUROC {r['auroc']:.4f}  FPR at 95 % TPR {r['fpr95']:.4f}  mean entropy "
                  f"in {r['entropy_in_mean']:.3f} / out {r['entropy_out_mean']:.3f}", flush=True)
        if cfg.adversarial:
            total = len(EPSILONS) * math.ceil(min(ADV_IMAGES, len(x_test)) / 100) * (1 + 2 * PGD_STEPS)
            out["adversarial"] = adversarial_evaluation(model, net, theta, data, cfg, progress("attacks", total))
    return out

# 10. The 1D toy (PAPER.md 5.5): networks trained by MSE on 20 points should agree on them, spread apart elsewhere =
def run_toy(cfg, device):
    """Train on y = x^3 + N(0, 3^2) at 20 points in [-4, 4] (official V1); 100 networks' mean and spread on [-6, 6]."""
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.rand(18, generator=g) * 8 - 4, torch.tensor([-4.0, 4.0])])
    x, y = x.unsqueeze(1).to(device), (x.pow(3) + 3 * torch.randn(20, generator=g)).to(device)   # (20, 1), (20,)
    # Deviation (row 30): targets divided by their std (about 40), so the MSE is of order 1 like Eq. (1)'s CE
    scale, zero, t0 = y.std(), torch.zeros((), device=device), time.perf_counter()
    net, model, D = build(cfg, "toy", 1, device)
    opts, sched = make_optimizers(model, D, cfg, cfg.epochs)
    if D is not None and cfg.mixer:
        pretrain_mixer(model)
    K = min(cfg.networks_per_step, model.max_networks)
    for step in range(cfg.epochs):
        stats = train_step(model, D, net, opts, x.expand(K, 20, 1), (y / scale).expand(K, 20), cfg.beta,
                           lambda out, target: (F.mse_loss(out.squeeze(-1).float(), target), zero))
        sched.step()
        if (step + 1) % max(1, cfg.epochs // 5) == 0:
            eta = (time.perf_counter() - t0) * (cfg.epochs / (step + 1) - 1)
            print(f"toy, {K} networks a step: step {step + 1:5d}, MSE {stats[0]:.4f}, ETA {eta:.0f} s", flush=True)
    seconds, grid = time.perf_counter() - t0, torch.linspace(-6, 6, 241, device=device).unsqueeze(1)
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(EVAL_SEED)
        theta = model.eval().sample(min(100, model.max_networks), torch.Generator(device).manual_seed(EVAL_SEED))
        pred = functional_forward(net, theta, torch.cat([grid, x])).squeeze(-1) * scale    # (n, 241 + 20)
    std, inside = pred[:, :len(grid)].std(0), grid.squeeze(1).abs() <= 4
    toy = dict(networks=len(pred), x=grid.squeeze(1).tolist(), mean=pred[:, :len(grid)].mean(0).tolist(),
               std=std.tolist(), train_x=x.squeeze(1).tolist(), train_y=y.tolist(),
               train_mse=(pred[:, len(grid):].mean(0) - y).pow(2).mean().item(),
               spread_inside=std[inside].mean().item(), spread_outside=std[~inside].mean().item())
    print(f"toy: {seconds:.1f} s; MSE of the {len(pred)}-network mean on the 20 points {toy['train_mse']:.2f} (noise "
          f"variance 9); spread inside [-4, 4] {toy['spread_inside']:.2f}, outside {toy['spread_outside']:.2f}")
    results = dict(dataset="toy", method=cfg.method, config=vars(cfg), train_seconds=seconds, toy=toy)
    write_results(cfg, results)
    return results

# 11. Checkpoints, results, figures: only into an --out-dir free of other runs' files, each via a renamed temporary file
OUTPUTS = ("checkpoint.pt", "best.pt", "results.json", "diversity.png", "entropy_cdf.png", "adversarial.png", "toy.png")
ARCH_OPTIONS = ("dataset", "method", "hidden", "mixer")                         # must match to load a checkpoint
TRAINING_OPTIONS = ("seed", "networks_per_step", "images_per_network", "shift", "init_spread", "lr", "lr_d", "beta",
                    "repulsion")

def check_paths(cfg):
    """Everything about files that can fail is checked here, before any long work."""
    if cfg.eval_only != bool(cfg.checkpoint) or (cfg.resume and cfg.eval_only):
        raise UserError("--checkpoint and --eval-only go together; to continue a run, pass its --out-dir and --resume")
    if cfg.dataset == "toy" and (cfg.resume or cfg.eval_only or cfg.ood or cfg.adversarial or cfg.export):
        raise UserError("--dataset toy has no images: --resume, --eval-only, --ood, --adversarial and --export are "
                        "for the image data sets")
    taken = [f for f in OUTPUTS if os.path.exists(os.path.join(cfg.out_dir, f))]
    if cfg.resume != ("checkpoint.pt" in taken) or (taken and not cfg.resume):
        raise UserError(f"--resume: there is no checkpoint.pt in --out-dir {cfg.out_dir!r}" if cfg.resume else
                        f"--out-dir {cfg.out_dir!r} already holds {', '.join(taken)} of another run; pass a new "
                        "--out-dir" + ("" if cfg.eval_only else ", or --resume to continue that run"))
    for folder, what in [(cfg.out_dir, "--out-dir")] + ([(cfg.export[1], "--export PATH")] if cfg.export else []):
        try:
            os.makedirs(folder, exist_ok=True)
            open(os.path.join(folder, ".write_test.tmp"), "w").close()
            os.remove(os.path.join(folder, ".write_test.tmp"))
        except OSError as e:
            raise UserError(f"{what} {folder!r} is not a writable folder ({e!r:.100})")
    if cfg.export and any(f.startswith("net_") for f in os.listdir(cfg.export[1])):
        raise UserError(f"--export PATH {cfg.export[1]!r} already holds exported networks; pass a new folder")

def atomic_write(path, write):
    try:
        write(path + ".tmp")
        os.replace(path + ".tmp", path)
    finally:
        Path(path + ".tmp").unlink(missing_ok=True)

def save_checkpoint(path, cfg, model, D, state):
    ckpt = dict(format=CHECKPOINT_FORMAT, config=vars(cfg), model=model.state_dict(), D=D and D.state_dict(),
                opt_g=state["opts"][0].state_dict(), opt_d=D and state["opts"][1].state_dict(),
                sched=state["sched"].state_dict(), rng_cpu=torch.get_rng_state(),
                rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                **{k: state[k] for k in ("epoch", "steps", "seconds", "best_val", "history")})
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))

def load_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(ckpt, dict) and "format" in ckpt
    except Exception as e:
        raise UserError(f"{path!r} is not a readable HyperGAN checkpoint ({e!r:.100})")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise UserError(f"{path!r} has checkpoint format {ckpt['format']}, this file reads {CHECKPOINT_FORMAT}")
    return ckpt

def restore(ckpt, cfg, model, D, state, path):
    """Loads model and D and, for --resume (state given), the training state, whose options must match too."""
    for k in ARCH_OPTIONS + (TRAINING_OPTIONS if state is not None else ()):
        if (was := ckpt["config"].get(k)) != getattr(cfg, k):
            raise UserError(f"{path!r} was trained with --{k.replace('_', '-')} {was}, this run has {getattr(cfg, k)}")
    try:
        for module, key in ((model, "model"), (D, "D")) + (tuple(zip((*state["opts"], state["sched"]),
                                                                   ("opt_g", "opt_d", "sched"))) if state else ()):
            if module is not None:
                module.load_state_dict(ckpt[key])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise UserError(f"{path!r} does not match this model ({e!r:.100})")
    if state is not None:
        state.update({k: ckpt[k] for k in ("epoch", "steps", "seconds", "best_val", "history")})
        torch.set_rng_state(ckpt["rng_cpu"])
        if ckpt["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng_cuda"][:torch.cuda.device_count()])

def export_networks(model, arch, num_classes, n, path):
    """path/net_000.pt, ...: state_dicts of small_net() or mednet(classes) (MC dropout: its network, no dropout)."""
    names = [name for name, _ in TARGETS[arch](num_classes).named_parameters()]
    model.eval()
    with torch.no_grad():
        theta = model.sample(n, torch.Generator(next(model.parameters()).device).manual_seed(EVAL_SEED))
    tensors = [t for pair in theta for t in pair]
    for k in range(n):
        atomic_write(os.path.join(path, f"net_{k:03d}.pt"),
                     lambda tmp: torch.save({name: t[k].float().cpu().clone() for name, t in zip(names, tensors)}, tmp))

def write_results(cfg, results):
    """results.json, then the PNG figures that the results allow."""
    path = os.path.join(cfg.out_dir, "results.json")
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))
    print(f"wrote {path}")
    try:
        import matplotlib
        matplotlib.use("Agg")                                                      # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        return print("figures: skipped, matplotlib is not installed")
    def save(fig, name):
        atomic_write(os.path.join(cfg.out_dir, name), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)
        print(f"figure: {os.path.join(cfg.out_dir, name)}")
    h, adv, toy = results.get("history"), results.get("adversarial"), results.get("toy")
    ood = {name: o["ecdf"] for name, o in (results.get("ood") or {}).items() if "ecdf" in o}
    if h and cfg.figures:                                                         # Fig. 7, and the disagreement
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        axes[0].plot([e["epoch"] for e in h], [e["diversity"]["weight_norm_rsd_mean"] for e in h], marker=".")
        axes[1].plot([e["epoch"] for e in h], [100 * e["diversity"]["disagreement"] for e in h], marker=".")
        axes[0].set(xlabel="epoch", title=f"{cfg.method}: std / mean of the weights' L2 norms (Fig. 7)")
        axes[1].set(xlabel="epoch", title=f"{cfg.method}: pairwise test disagreement (%)")
        save(fig, "diversity.png")
    if ood and cfg.figures:                                                       # the paper's entropy CDFs
        fig, ax = plt.subplots(figsize=(5, 4))
        for name, e in ood.items():
            ax.plot(e["entropy_out"], e["quantiles"], label=name)
        ax.plot(e["entropy_in"], e["quantiles"], "k--", label="test (in distribution)")
        ax.set(xlabel="entropy of the mean softmax (nats)", title=f"{cfg.method}: fraction of inputs")
        ax.legend()
        save(fig, "entropy_cdf.png")
    if adv and cfg.figures:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for name in ("fgsm", "pgd", "pgd_fresh"):
            axes[0].plot(EPSILONS, [100 * v["accuracy"] for v in adv[name].values()], marker="o", label=name)
            axes[1].plot(EPSILONS, [v["auroc"] or math.nan for v in adv[name].values()], marker="o", label=name)
        for ax, title in zip(axes, ("accuracy under attack (%)", "detection AUROC (entropy)")):
            ax.set(xscale="log", xlabel="eps, L-inf in [0, 1] pixels", title=f"{cfg.method}: {title}")
            ax.legend()
        save(fig, "adversarial.png")
    if toy and cfg.figures:                                                       # the networks' predictive spread
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.fill_between(toy["x"], *[[m + k * s for m, s in zip(toy["mean"], toy["std"])] for k in (-2, 2)], alpha=0.3)
        ax.plot(toy["x"], toy["mean"], "-", toy["x"], [v**3 for v in toy["x"]], "k--")
        ax.plot(toy["train_x"], toy["train_y"], "k.")
        ax.set(xlabel="x", ylim=(-250, 250), title=f"1D toy, {cfg.method}: mean ± 2 std, x³ (dashed), data")
        save(fig, "toy.png")

# 12. torchrun --nproc_per_node=N hypergan.py: each process its own networks and images, DDP averages the gradients
def init_distributed(name):
    """(rank, world size, device) for --device name (auto: cuda, then mps, then cpu)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name != "cpu" and not (torch.cuda if name == "cuda" else torch.backends.mps).is_available():
        raise UserError(f"--device {name} is not available here; use --device auto")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, torch.device(name)
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if name == "cuda" else torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device

# 13. Main: check the input, load the data, train (or resume, or load a checkpoint), evaluate on test, write =====
def main(argv=None):
    try:
        cfg = parse_args(argv)
        check_paths(cfg)
        rank, world, device = init_distributed(cfg.device)
        torch.manual_seed(cfg.seed)                   # the CPU and CUDA generators; data splits have their own
        if cfg.dataset == "toy":
            return run_toy(cfg, device)
        ckpt_path = cfg.checkpoint or os.path.join(cfg.out_dir, "checkpoint.pt")
        ckpt = load_checkpoint(ckpt_path) if cfg.eval_only or cfg.resume else None
        if cfg.eval_only:                             # how it was trained (the standard ensemble: how many members)
            vars(cfg).update({k: ckpt["config"][k] for k in TRAINING_OPTIONS + ("epochs",)})
        data = load_data(cfg, device)
        net, model, D = build(cfg, data["arch"], data["num_classes"], device)
        log = print if rank == 0 else (lambda *a, **k: None)
        log(f"{cfg.method} on {cfg.dataset}: {len(data['train'][0])} training images, {device} x {world} processes")
        opts, sched = make_optimizers(model, D, cfg, max(1, epoch_layout(cfg, len(data["train"][0]), world)[0]
                                                         * cfg.epochs))
        state = dict(opts=opts, sched=sched, epoch=0, steps=0, seconds=0.0, best_val=-1.0, history=[])
        if ckpt is not None:
            restore(ckpt, cfg, model, D, None if cfg.eval_only else state, ckpt_path)
            log(f"resumed from {ckpt_path} after epoch {state['epoch']}" if cfg.resume else f"loaded {ckpt_path}")
        elif D is not None and cfg.mixer:
            log(f"mixer pre-training: {PRETRAIN_STEPS} steps, moment-matching loss {pretrain_mixer(model):.4f}")
        if not cfg.eval_only:
            ddp = None
            if world > 1:                             # each process its own networks; DDP copies rank 0's weights
                torch.manual_seed(cfg.seed + 7919 * rank + state["epoch"])
                ids = [device] if device.type == "cuda" else None
                ddp = tuple(m and nn.parallel.DistributedDataParallel(m, device_ids=ids) for m in (model, D))
            train(cfg, model, D, net, data, state, ddp, rank, world)
            if world > 1:   # all wait for rank 0's last checkpoint, then close the group while Python is fully alive
                checksum = sum(p.double().sum().item() for m in (model, D) if m is not None for p in m.parameters())
                print(f"rank {rank}/{world}: parameter checksum {checksum:.10e}", flush=True)
                del ddp                               # the DDP wrappers hold the group: a gloo group left to the
                torch.distributed.barrier()           # interpreter's exit can abort the process
                torch.distributed.destroy_process_group()
            if rank != 0:
                return None
            model.load_state_dict(load_checkpoint(os.path.join(cfg.out_dir, "best.pt"))["model"])
        n_eval, t0 = min(cfg.eval_networks, model.max_networks), time.perf_counter()
        r = evaluate(model, net, *data["test"], n_eval, report=progress("test evaluation, networks", n_eval))
        print(f"\ntest set, {n_eval} networks ({time.perf_counter() - t0:.1f} s); pairwise disagreement "
              f"{100 * (r['disagreement'] or 0):.2f} %\n networks | accuracy % (std) |    NLL | paper (Table 2)")
        for m, e in r["ensemble"].items():    # std: over single networks for size 1, over the groups for size m
            ours = f"{100 * e['mean']:8.2f} ± {100 * e['std']:.2f} | {r['nll'][m]:.4f}" if e else " " * 25
            print(f"{m:>9} | {ours} | {PAPER_TABLE2.get(cfg.dataset, {}).get(m, '-')}")
        trained, e100 = ckpt if cfg.eval_only else state, r["ensemble"].get("100")
        seconds, steps, passes = trained["seconds"], trained["steps"], cfg.networks_per_step * cfg.images_per_network
        results = dict(dataset=cfg.dataset, method=cfg.method, config=vars(cfg), processes=world,
                       checkpoint=cfg.checkpoint or None, nll=r["nll"], disagreement=r["disagreement"],
                       accuracy=dict(single_mean=r["single_mean"], single_std=r["single_std"], ensemble=r["ensemble"]),
                       ensemble_gain=e100 and e100["mean"] - r["single_mean"], train_seconds=seconds,
                       steps_per_second=steps / seconds, networks_x_images_per_second=steps * passes * world / seconds,
                       seconds_per_epoch=seconds / len(trained["history"]), eval_seconds=time.perf_counter() - t0,
                       history=trained["history"], paper=PAPER_TABLE2.get(cfg.dataset),
                       **uncertainty_evaluation(model, net, data, cfg))
        import resource                               # peak memory: CUDA's allocator, or the process's (Linux: KiB)
        results["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
        write_results(cfg, results)
        if cfg.export:
            export_networks(model, data["arch"], data["num_classes"], *cfg.export)
            print(f"exported {cfg.export[0]} networks to {cfg.export[1]}: {data['arch']} state_dicts; their input: "
                  f"(pixels in [0, 1] - {data['mean'].flatten().tolist()}) / {data['std'].flatten().tolist()}")
        return results
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted; files already written are kept, and a training run continues from its last "
              "finished epoch with --resume", file=sys.stderr)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    sys.exit(2)


if __name__ == "__main__":
    main()
