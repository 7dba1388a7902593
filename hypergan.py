"""HyperGAN: a generative model for diverse, performant neural networks.
Ratzlaff & Fuxin, ICML 2019, arXiv:1901.11058. One annotated file, read next to the paper.

    s ~ N(0, I) -> mixer Q -> codes z_1..z_N, one per layer of the target network F   (Fig. 1)
    theta_i = G_i(z_i): one generator per layer gives that layer's weight and bias      (Fig. 1)
    min over Q, G of  E[CE(F(x; theta), y)] - beta * Dist(z, P)                     Eq. (1), (2)
    Dist = -sum_i [log D(p_i) + log(1 - D(z_i))],  p_i ~ P = N(0, I)                     Eq. (3)
    a new s is a new network: an ensemble of any size is free

Run:   python hypergan.py --dataset mnist     # downloads; --data-root DIR --no-download: a copy
       python hypergan.py --dataset cifar10   # also mnist5000, cifar5 (Table 2), toy (1D)
       python hypergan.py --dataset mnist0-4 --ood mnist5-9,noise --adversarial   # uncertainty
       python hypergan.py --method ensemble   # or dropout; ablations: --beta 0, --no-mixer
Test:  python -m pytest -q test_hypergan.py

Table 2, test accuracy % of 1 / 100 sampled networks, mean of 3 seeds (paper_notes.md: each seed,
5 and 10 networks, the commands; CPU: a 2-core AMD EPYC, torch 2.14.1; GPU: one H200, bf16):
    MNIST 99.29 / 99.35 (CPU, 7 min), 99.31 / 99.38 (H200, 98 s); paper 98.64 / 99.31
    MNIST-5000 98.76 / 98.99 (CPU, 6 min), 98.72 / 98.97 (H200); paper 96.69 / 97.71
    CIFAR-10 (a JPEG copy: about 1 point lower) 75.45 / 75.50 (CPU, 41-44 min); paper 76.32 / 77.71
    CIFAR-5 (JPEG copy, 60 epochs) 83.92 / 84.01 (CPU, 42 min alone); paper 84.50 / 85.81
    Diversity: 100 networks gain +0.07 / +0.04-0.05 over one (MNIST / CIFAR-10); paper +0.67 / +1.39

Glossary: K networks sampled a step; b images each network sees a step; N layers of the target;
d the size of a code z_i; theta the parameters of K networks: [(weight_i, bias_i) for each layer].
"""
import argparse
import contextlib
import copy
import dataclasses
import glob
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# 1. Configuration ===============================================================================
# "Deviation (row N)": a departure from the paper or the official code; paper_notes.md, row N.
S_DIM = 256  # size of the noise s (official V1 MNIST code; CIFAR too: row 4)
Z_DIM = 128  # d, the size of each code z_i (official V1 MNIST code)
PRETRAIN_STEPS = 100  # steps of the mixer's pre-training (official: at most 100 on MNIST)
VAL_SIZE = 5000  # training images held out to pick the best epoch (synthetic sets: 512)
VAL_NETWORKS = 10  # networks sampled for the validation accuracy
EVAL_SEED = 1234  # the noise of evaluated networks: the same networks for every checkpoint
DROPOUT = 0.2  # p of the MC dropout baseline
UQ_NETWORKS = 10  # the ensemble that scores OOD inputs and adversarial examples
ADV_IMAGES = 1000  # test images attacked
PGD_STEPS = 10  # iterations of PGD
EPSILONS = (0.01, 0.03, 0.08, 0.1, 0.3)  # attack sizes, L-inf in [0, 1] pixel units
MEMORY_BUDGET = 2**30  # bytes for the chunk of networks x images that evaluation runs at once
CHECKPOINT_FORMAT = 5  # 5: the 2019 CIFAR net, and lr_spread's own group of Adam

# Per data set (--help prints them): networks_per_step is K (row 6), images_per_network b (row 5);
# shift: the pixels a training image moves (MNIST: row 17; CIFAR: the official crop, and a flip);
# init_spread: how far apart the first networks start (row 3); lr_spread: W's rate x --lr (row 7).
BASE_RECIPE = dict(networks_per_step=16, images_per_network=8, init_spread=0.1, lr_spread=1.0)
CIFAR_RECIPE = dict(BASE_RECIPE, shift=4, lr_spread=0.1)
RECIPES = {
    "mnist": dict(BASE_RECIPE, epochs=20, shift=2),
    "mnist5000": dict(BASE_RECIPE, epochs=60, shift=2),
    "mnist0-4": dict(BASE_RECIPE, epochs=20, shift=2),
    "cifar10": dict(CIFAR_RECIPE, epochs=30),
    "cifar5": dict(CIFAR_RECIPE, epochs=60),  # 20,000 images: near CIFAR-10's steps
    "synthetic-mnist": dict(BASE_RECIPE, epochs=3, shift=2, networks_per_step=8),
    "synthetic-cifar10": dict(BASE_RECIPE, epochs=3, shift=4, networks_per_step=8),
    "toy": dict(BASE_RECIPE, epochs=2000, networks_per_step=32, images_per_network=20,
                shift=0, init_spread=1.0),
}
METHOD_RECIPES = {
    "ensemble": dict(networks_per_step=10, images_per_network=32),  # 10 members, 32 images each
    "dropout": dict(networks_per_step=16, images_per_network=8),  # one network, 16 x 8 masks
}
OOD_SETS = ("mnist5-9", "notmnist", "cifar5-9", "noise")  # the paper's, and uniform noise

class UserError(Exception):
    """Bad input or a failed run: main prints it as one `error:` line and exits with code 2."""

# 2. Target networks F(x; theta) (PAPER.md 3): plain nn.Sequential; functional_forward runs K =====
def small_net(num_classes=10, dropout=0.0):
    """MNIST target (official); p > 0: MC dropout. Deviation (row 14, exact): pooling first."""
    drop = [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(nn.Conv2d(1, 32, 5), nn.MaxPool2d(2), nn.LeakyReLU(0.01), *drop,
                         nn.Conv2d(32, 32, 5), nn.MaxPool2d(2), nn.LeakyReLU(0.01), *drop,
                         nn.Flatten(), nn.Linear(512, num_classes))  # (B, 32, 4, 4) -> (B, 512)

def mednet(num_classes=10, dropout=0.0):
    """CIFAR target, Deviation (row 18): the 2019 code's 'mednet' (V1's: conv 16/32/32, 128-64)."""
    drop = [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(nn.Conv2d(3, 32, 3), nn.MaxPool2d(2), nn.ReLU(), *drop,  # (B, 32, 15, 15)
                         nn.Conv2d(32, 64, 3), nn.MaxPool2d(2), nn.ReLU(), *drop,  # (B, 64, 6, 6)
                         nn.Conv2d(64, 64, 3), nn.MaxPool2d(2), nn.ReLU(), *drop,  # (B, 64, 2, 2)
                         nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), *drop,
                         nn.Linear(128, num_classes))

def toy_net(num_classes=1, dropout=0.0):  # the 1D toy's target (official V1)
    drop = [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(nn.Linear(1, 200), nn.ELU(), *drop, nn.Linear(200, 1))

TARGETS = {"small": small_net, "mednet": mednet, "toy": toy_net}

def param_layers(net):
    """The layers with parameters, in order: layer i gets generator G_i."""
    return [layer for layer in net if isinstance(layer, (nn.Conv2d, nn.Linear))]

ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Dropout,
               nn.Identity)
POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)

def check_target(net):
    """Refuses, in one line, a target that functional_forward would not run exactly (README:
    Conv2d and pooling, one nn.Flatten(), then Linear; biases; ELEMENTWISE layers anywhere)."""
    if not isinstance(net, nn.Sequential):
        raise UserError(f"the target network must be an nn.Sequential, not {type(net).__name__}")
    flat = maps = False  # a Flatten seen; a convolution or pooling seen
    for i, layer in enumerate(net):
        problem = None
        if not isinstance(layer, (nn.Conv2d, nn.Linear, nn.Flatten, *POOLING, *ELEMENTWISE)):
            problem = "is not a layer functional_forward runs"
        elif isinstance(layer, (nn.Conv2d, nn.Linear)) and layer.bias is None:
            problem = "has no bias (G_i gives every layer one)"
        elif isinstance(layer, nn.Conv2d) and (layer.groups, layer.padding_mode) != (1, "zeros"):
            problem = "has groups != 1 or pads with other values than zeros"
        elif isinstance(layer, (nn.Conv2d, nn.Flatten, *POOLING)) and flat:
            problem = "comes after the Flatten"
        elif isinstance(layer, nn.Flatten) and (layer.start_dim, layer.end_dim) != (1, -1):
            problem = "flattens other dimensions than nn.Flatten()"
        elif isinstance(layer, nn.Linear) and maps and not flat:
            problem = "follows image maps without an nn.Flatten() between them"
        if problem:
            raise UserError(f"the target's layer {i}, {layer}, {problem}; accepted: Conv2d, "
                            "Linear, Flatten, pooling, Dropout and elementwise activations")
        flat = flat or isinstance(layer, nn.Flatten)
        maps = maps or isinstance(layer, (nn.Conv2d, *POOLING))

# theta, the parameters of K networks: [(weight (K, *shape), bias (K, out)) for each layer]. Each
# method of Table 2 is an nn.Module whose sample(n) is theta of n networks (a standard ensemble: at
# most its members), its noise from torch's generator (`sampling`); a baseline trains sample(K).
def functional_forward(net, theta, x, shared=False):
    """F(x; theta) of K networks at once: (K, B, outputs). x: (K, B, *input), network k on x[k];
    shared: x is (B, *input), seen by all. Dropout stays on (MC dropout). The K networks' maps sit
    side by side, (B, K*C, H, W): groups=K convolves block k with network k's filters (tested)."""
    K = len(theta[0][0])
    params = iter(theta)
    if shared and not isinstance(net[0], nn.Conv2d):
        x, shared = x.expand(K, *x.shape), False  # a view: K networks, one input
    h = x
    if x.dim() == 5:  # images of each network
        h = x.transpose(0, 1).flatten(1, 2)  # (K, B, C, H, W) -> (B, K*C, H, W)
        # Speed: channels-last, read fastest by a CPU's convolution (plain: leave the line out)
        h = h.contiguous(memory_format=torch.channels_last)
    for layer in net:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            weight, bias = next(params)  # (K, O, C, kh, kw) or (K, O, I); (K, O)
        if isinstance(layer, nn.Conv2d) and shared:
            h = shared_input_conv(h, weight, bias, layer)  # (B, K*O, H', W')
            shared = False
        elif isinstance(layer, nn.Conv2d):
            h = F.conv2d(h, weight.flatten(0, 1), bias.flatten(), layer.stride,
                         layer.padding, layer.dilation, groups=K)  # (B, K*O, H', W')
        elif isinstance(layer, nn.Flatten):
            h = h.unflatten(1, (K, -1))  # (B, K, C, H, W)
            h = h.flatten(2).transpose(0, 1)  # (K, B, C*H*W)
        elif isinstance(layer, nn.Linear):
            h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))  # (K, B, O)
        elif isinstance(layer, nn.Dropout):
            h = F.dropout(h, layer.p, training=True)  # on at test time too
        else:
            h = layer(h)  # activation or pooling
    return h

def shared_input_conv(h, weight, bias, layer):
    """K convolutions, as `layer` (stride, zero padding, dilation), of one input h (B, C, H, W).
    Speed: plainly F.conv2d(h.repeat(1, K, 1, 1), weight.flatten(0, 1), ..., groups=K); one matrix
    product of h's patches with all K*O filters evaluates 2.5-4x as fast on a CPU ("Speed")."""
    h = F.pad(h, layer._reversed_padding_repeated_twice)  # the layer's zeros, 'same' included
    B, C, H, W = h.shape
    kh, kw = layer.kernel_size
    dh, dw = layer.dilation
    sh, sw = layer.stride
    H_out = (H - dh * (kh - 1) - 1) // sh + 1
    W_out = (W - dw * (kw - 1) - 1) // sw + 1
    patches = F.unfold(h, (kh, kw), (dh, dw), 0, (sh, sw))  # (B, C*kh*kw, H'*W')
    patches = patches.transpose(1, 2).flatten(0, 1)  # (B*H'*W', C*kh*kw)
    filters = weight.flatten(0, 1).flatten(1).t()  # (C*kh*kw, K*O)
    out = torch.addmm(bias.flatten(), patches, filters)  # (B*H'*W', K*O)
    out = out.view(B, H_out, W_out, -1)  # (B, H', W', K*O)
    return out.permute(0, 3, 1, 2)  # (B, K*O, H', W')

# 3. The hypernetwork (Fig. 1; PAPER.md 1.1, 2): the mixer Q, the generators G_i, and D ==========
def hidden_layers(sizes, activation, batchnorm=True):
    """Linear, BatchNorm (optional) and the activation, for each consecutive pair of sizes."""
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        norm = [nn.BatchNorm1d(n_out)] if batchnorm else []
        layers += [nn.Linear(n_in, n_out), *norm, activation()]
    return layers

# Deviation (row 3), the largest departure from Fig. 1: G_i's output layer (officially a Linear).
# Here theta_i = bias + scale * (W h), scale = 1 / sqrt(fan_in) of layer i: the bias is a whole
# network (it starts as layer i's default init, the mean network) and W h sets each network apart
# (W starts at init_spread x its own init). Unscaled, the first logits explode. W's rate: row 7.
class ScaledLinear(nn.Linear):
    def __init__(self, n_in, layer, init_spread):
        super().__init__(n_in, layer.weight.numel() + layer.bias.numel())
        self.scale = 1 / math.sqrt(layer.weight[0].numel())  # 1 / sqrt(fan_in)
        with torch.no_grad():
            self.bias.copy_(torch.cat([layer.weight.flatten(), layer.bias]))
            self.weight.mul_(init_spread)

    def forward(self, h):
        return F.linear(h, self.weight) * self.scale + self.bias

class HyperGAN(nn.Module):
    """Q and the G_i of Fig. 1 for the target `net`. Q: s (K, S_DIM) -> z (K, N * d), Linear-BN-ReLU
    x 2, Linear (official; Deviation (row 15): no N(0, 0.01^2) noise added to s). G_i: z_i (K, d) ->
    theta_i, Linear-BN-ELU x 2, ScaledLinear; Deviation (row 2): layer i's bias too (2019 code)."""
    def __init__(self, net, hidden=256, init_spread=0.1, mixer=True):
        super().__init__()
        layers = param_layers(net)
        self.shapes = [(layer.weight.shape, layer.bias.shape) for layer in layers]
        N = len(layers)
        self.s_dim = S_DIM if mixer else N * Z_DIM  # no mixer (Fig. 7, row 29): s is the codes
        self.Q = nn.Identity()
        if mixer:
            self.Q = nn.Sequential(*hidden_layers([S_DIM, hidden, hidden], nn.ReLU),
                                   nn.Linear(hidden, N * Z_DIM))
        self.G = nn.ModuleList()
        for layer in layers:  # G_i for each layer i
            self.G.append(nn.Sequential(*hidden_layers([Z_DIM, hidden, hidden], nn.ELU),
                                        ScaledLinear(hidden, layer, init_spread)))

    def sample_s(self, K):
        return torch.randn(K, self.s_dim, device=next(self.parameters()).device)  # s ~ N(0, I)

    def codes(self, s):
        return self.Q(s).view(len(s), -1, Z_DIM)  # z = Q(s): (K, N, d)

    def generate(self, z):
        """theta_i = G_i(z_i) for each layer i: [(weight (K, *shape), bias (K, out)), ...]."""
        theta = []
        for G_i, z_i, (w_shape, b_shape) in zip(self.G, z.unbind(1), self.shapes):
            out = G_i(z_i)  # (K, |weight| + |bias|)
            weight, bias = out.split([w_shape.numel(), b_shape.numel()], dim=1)
            theta.append((weight.view(-1, *w_shape), bias))  # (K, *shape), (K, out)
        return theta

    @torch.no_grad()
    def sample(self, n):
        return self.generate(self.codes(self.sample_s(n)))  # n new networks

def discriminator(hidden=256):
    """D: a code z_i or a prior sample p_i (.., d) -> a logit l, D(.) = sigmoid(l); one for all."""
    return nn.Sequential(*hidden_layers([Z_DIM, hidden, hidden], nn.ReLU, batchnorm=False),
                         nn.Linear(hidden, 1))

# 4. The objective (PAPER.md 1.2). D's logit l: log D = logsigmoid(l), log(1 - D) = logsigmoid(-l)
def classification_loss(out, y):
    """Eq. (1)'s loss: the cross-entropy of every network on its own images, averaged over the
    K x b (row 8); and the accuracy. out: (K, b, classes); y: (K, b)."""
    ce = F.cross_entropy(out.flatten(0, 1).float(), y.flatten())
    accuracy = (out.argmax(-1) == y).float().mean()
    return ce, accuracy

def regression_loss(out, y):
    """The 1D toy's loss in Eq. (1): the mean squared error; no accuracy. out: (K, b, 1)."""
    mse = F.mse_loss(out.squeeze(-1).float(), y)
    return mse, torch.zeros_like(mse)

def discriminator_loss(D, z, p):
    """D minimises Eq. (3) as written (row 1): D(p_i) -> 1, D(z_i) -> 0. z, p: (K, N, d)."""
    logits = D(torch.cat([p, z])).squeeze(-1)  # one call of D: (2K, N)
    logit_p, logit_z = logits.chunk(2)  # (K, N) each
    # Eq. (3): Dist = -sum_i [ log D(p_i) + log(1 - D(z_i)) ], averaged over the K networks
    return -(F.logsigmoid(logit_p) + F.logsigmoid(-logit_z)).sum(1).mean()

def code_distance(D, z):
    """Dist_z, Eq. (3)'s terms in the codes: -sum_i log(1 - D(z_i)), averaged over K. Eq. (2)
    subtracts it: Q pushes D(z_i) up, to the prior's label. The saturating minimax form: as D(z_i)
    -> 0 its gradient vanishes, and our runs end with D(z) < 0.001 (paper_notes.md, section 4)."""
    return -F.logsigmoid(-D(z).squeeze(-1)).sum(1).mean()

def pretrain_mixer(model, steps=PRETRAIN_STEPS, batch=1000):
    """Before training (official README: on), fit Q so each code z_i has mean 0 and covariance I on
    a batch (Deviation (row 16): those exact moments). In 100 steps: mean 0, covariance near I."""
    optimizer = torch.optim.Adam(model.Q.parameters(), lr=1e-3)
    eye = torch.eye(Z_DIM, device=next(model.parameters()).device)
    for _ in range(steps):
        z = model.codes(model.sample_s(batch)).transpose(0, 1)  # (N, batch, d)
        mean = z.mean(1)  # (N, d)
        left = (z - mean[:, None]).transpose(1, 2)  # (N, d, batch)
        cov = left @ (z - mean[:, None]) / (batch - 1)  # (N, d, d)
        loss = mean.pow(2).mean() + (cov - eye).pow(2).mean()
        descend(optimizer, loss)
    return loss.item()

def repulsion(logits):
    """Beyond the paper (row 32; the authors' 2020 successor): the mean RBF kernel
    exp(-|f_i - f_j|^2 / h) over pairs i != j of the K networks' logits f on one shared batch,
    h = median |f_i - f_j|^2 / log K. It is small when the networks' functions differ."""
    f = logits.float().flatten(1)  # (K, b * classes)
    off_diagonal = ~torch.eye(len(f), dtype=torch.bool, device=f.device)
    d2 = torch.cdist(f, f).pow(2)[off_diagonal]  # (K * (K - 1),)
    bandwidth = d2.median().detach() / math.log(len(f)) + 1e-8
    return torch.exp(-d2 / bandwidth).mean()

# 5. The training step ============================================================================
STATS = ("ce", "d_loss", "q_adv", "D(p)", "D(z)", "acc")  # q_adv = -Dist_z, what Q minimises
LIKELIHOOD_STATS = ("ce", "acc")

def mixed_precision(x):
    """bfloat16 autocast on a GPU, for the forward passes of Q, the G_i and F; off on a CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda)

def descend(optimizer, loss):
    """One step down the gradient of `loss`."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

def hypergan_step(model, D, net, opt, x, y, beta, task_loss=classification_loss,
                  repulsion_weight=0.0):
    """One step of HyperGAN: D on Eq. (3), then Q and the G_i on Eq. (2), 1:1 (official code).
    x: (K, b, C, H, W), network k on its own images x[k]; y: (K, b). Returns STATS, a tensor."""
    with mixed_precision(x):
        s = model.sample_s(len(x))  # s ~ N(0, I): (K, s_dim)
        z = model.codes(s)  # z = Q(s): (K, N, d)
        theta = model.generate(z)  # theta_i = G_i(z_i)
        out = functional_forward(net, theta, x)  # F(x; theta): (K, b, classes)
    z = z.float()

    # D step: min over D of Eq. (3), Dist = -sum_i [log D(p_i) + log(1 - D(z_i))]; z held fixed
    p = torch.randn_like(z)  # p_i ~ P = N(0, I)
    d_loss = discriminator_loss(D, z.detach(), p)
    descend(opt.d, d_loss)

    # Q and G step: min over Q, G of Eq. (2), E[CE(F(x; theta), y)] - beta * Dist; D held fixed
    ce, accuracy = task_loss(out, y)  # Eq. (1)
    D.requires_grad_(False)  # no gradient reaches D's weights
    dist_z = code_distance(D, z)
    D.requires_grad_(True)
    loss = ce - beta * dist_z  # Eq. (2)
    if repulsion_weight:  # beyond the paper (row 32); off by default
        with mixed_precision(x):  # all K networks on network 0's images
            shared = functional_forward(net, theta, x[0], shared=True)
        loss = loss + repulsion_weight * repulsion(shared)
    descend(opt.g, loss)

    with torch.no_grad():  # for the log: D after its step
        D_p = torch.sigmoid(D(p)).mean()
        D_z = torch.sigmoid(D(z)).mean()
        return torch.stack([ce, d_loss, -dist_z, D_p, D_z, accuracy])

class Optimizers(NamedTuple):
    g: torch.optim.Optimizer  # Q and the G_i, or a baseline's networks
    d: torch.optim.Optimizer  # D (None for the baselines)
    schedule: torch.optim.lr_scheduler.LambdaLR

def make_optimizers(model, D, cfg, total_steps):
    """Adam for Q and the G_i (or a baseline's networks), and for D. Deviation (row 7): official
    V1 has betas (0.5, 0.9), Q 5e-4, G 1e-4, D 1e-4, all constant. W of G_i's last layer (theta_i
    = bias + scale W h) at lr_spread x --lr: Adam moves its columns as far as the bias."""
    spread = []  # W of each G_i's last layer
    if isinstance(model, HyperGAN):
        spread = [G_i[-1].weight for G_i in model.G]
    rest = [p for p in model.parameters() if all(p is not w for w in spread)]
    groups = [dict(params=rest), dict(params=spread, lr=cfg.lr * cfg.lr_spread)]
    # Speed: fused=True makes Adam's update one kernel a step (plain: leave it out)
    opt_g = torch.optim.Adam(groups, lr=cfg.lr, fused=True)  # betas (0.9, 0.999)
    opt_d = None  # the baselines have no D
    if D is not None:
        opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=(0.5, 0.999), fused=True)

    def cosine(step):
        return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return Optimizers(opt_g, opt_d, torch.optim.lr_scheduler.LambdaLR(opt_g, cosine))

# 6. The baselines of Table 2, "Random Start" and "MC Dropout": the other sample(n) models =======
# They train by Eq. (1) alone (likelihood_step) and are evaluated as HyperGAN is.
class StandardEnsemble(nn.Module):
    """M independently initialised networks (row 20), each parameter one (M, *shape) stack."""
    def __init__(self, net, members):
        super().__init__()
        nets = [copy.deepcopy(net) for _ in range(members)]
        for member in nets:
            for layer in param_layers(member):
                layer.reset_parameters()  # a fresh default init
        per_parameter = zip(*(member.parameters() for member in nets))  # M tensors each
        stacks = [torch.stack(tensors) for tensors in per_parameter]  # (M, *shape) each
        self.params = nn.ParameterList(nn.Parameter(t) for t in stacks)

    def sample(self, n):
        """The first n members (all of them if n is larger): [(weight, bias)] per layer."""
        params = [t[:n] for t in self.params]
        return list(zip(params[0::2], params[1::2]))

class MCDropout(nn.Module):
    """One network, dropout on at test time (Gal & Ghahramani, 2016; row 21): a mask a network."""
    def __init__(self, net):
        super().__init__()
        copies = [nn.Parameter(t.detach().clone()) for t in net.parameters()]
        self.params = nn.ParameterList(copies)

    def sample(self, n):
        params = [t.expand(n, *t.shape) for t in self.params]  # n views of one network
        return list(zip(params[0::2], params[1::2]))

def likelihood_step(model, net, opt, x, y):
    """One step of Eq. (1) alone, for the baselines: the K members, or one network under masks."""
    with mixed_precision(x):
        out = functional_forward(net, model.sample(len(x)), x)  # (K, b, classes)
    loss, accuracy = classification_loss(out, y)  # Eq. (1)
    descend(opt.g, loss)
    return torch.stack([loss.detach(), accuracy])  # LIKELIHOOD_STATS

def build(cfg, arch, num_classes, device):
    """(target network, the distribution over its parameters that the run trains, D or None)."""
    dropout = DROPOUT if cfg.method == "dropout" else 0.0
    net = TARGETS[arch](num_classes, dropout).to(device)
    check_target(net)
    if cfg.method == "dropout":
        return net, MCDropout(net), None
    if cfg.method == "ensemble":
        return net, StandardEnsemble(net, cfg.networks_per_step), None
    model = HyperGAN(net, cfg.hidden, cfg.init_spread, cfg.mixer).to(device)
    return net, model, discriminator(cfg.hidden).to(device)

# 7. Data: each split one tensor on the device; batches by indexing; augmentation in batch =======
MEAN_STD = dict(mnist=((0.1307,), (0.3081,)),  # official code, both
                cifar10=((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)))

class Split(NamedTuple):
    x: torch.Tensor  # normalised images (n, C, H, W)
    y: torch.Tensor  # labels (n,)

@dataclasses.dataclass
class Data:
    train: Split
    val: Split  # held-out training images: they pick the best epoch (row 10)
    test: Split
    num_classes: int
    arch: str  # the target network: "small" (MNIST-shaped) or "mednet" (CIFAR-shaped)
    mean: torch.Tensor  # (C, 1, 1): pixels in [0, 1] are normalised as (pixels - mean) / std
    std: torch.Tensor
    ood: dict  # OOD set name -> normalised images

def normalise(pixels, mean, std):
    return (pixels.to(mean.device) - mean) / std

def synthetic_split(shape, n, seed):
    """Offline stand-in data (row 31): a class's fixed pattern, moved up to 2 pixels, plus noise."""
    C, H, W = shape
    fixed = torch.Generator().manual_seed(0)
    coarse = torch.randn(10, C, H // 4, W // 4, generator=fixed)
    patterns = F.interpolate(coarse, size=(H, W), mode="bilinear")  # the same in every split
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(10, (n,), generator=g)
    moves = torch.randint(-2, 3, (2, n), generator=g)
    x = torch.stack([torch.roll(patterns[c], shifts=(dy, dx), dims=(1, 2))
                     for c, dy, dx in zip(y.tolist(), *moves.tolist())])  # (n, C, H, W)
    noisy = (x + 0.8 * torch.randn(n, C, H, W, generator=g)) / 6 + 0.5
    return noisy.clamp(0, 1), y

def torchvision_split(name, root, train, download):
    """Pixels (n, C, H, W) in [0, 1] and labels of a torchvision set; a failure is a UserError."""
    import torchvision.datasets
    datasets = dict(mnist=torchvision.datasets.MNIST, cifar10=torchvision.datasets.CIFAR10)
    try:
        ds = datasets[name](root, train=train, download=download)
        x = torch.as_tensor(ds.data)
        y = torch.as_tensor(ds.targets)
        x = x.unsqueeze(1) if name == "mnist" else x.permute(0, 3, 1, 2)  # (n, C, H, W)
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"{len(x)} images and {len(y)} labels")
    except Exception as e:  # offline, a failed download, a corrupt or truncated file
        hint = "check the network or the files" if download else "--no-download needs them there"
        raise UserError(f"could not load {name} from {root!r} ({e!r:.100}); {hint}")
    return x.float().div(255), y.long()

def read_notmnist(root):
    """notMNIST_small as unpacked, <root>/notMNIST_small/<letter>/*.png (row 25)."""
    from PIL import Image  # installed with torchvision
    from torchvision.transforms.functional import pil_to_tensor
    images = []
    for path in sorted(glob.glob(os.path.join(root, "notMNIST_small", "*", "*"))):
        try:
            image = pil_to_tensor(Image.open(path).convert("L"))  # (1, H, W) bytes
        except OSError:  # the archive holds a few unreadable files
            continue
        if image.shape == (1, 28, 28):
            images.append(image.float() / 255)
    if not images:
        raise UserError(f"--ood notmnist: no readable images in {root}/notMNIST_small; unpack "
                        "notMNIST_small.tar.gz there")
    return torch.stack(images)

def load_data(cfg, device):
    """The splits and the OOD sets, all loaded before training: a missing set fails in seconds."""
    if cfg.dataset.startswith("synthetic"):
        shape = (1, 28, 28) if cfg.dataset == "synthetic-mnist" else (3, 32, 32)
        x, y = synthetic_split(shape, cfg.synthetic_size, seed=1)
        x_test, y_test = synthetic_split(shape, max(1024, cfg.synthetic_size // 5), seed=2)
        mean = (0.5,) * shape[0]
        std = (1 / 6,) * shape[0]
        val_size = 512
    else:
        base = "mnist" if cfg.dataset.startswith("mnist") else "cifar10"
        x, y = torchvision_split(base, cfg.data_root, True, cfg.download)
        x_test, y_test = torchvision_split(base, cfg.data_root, False, cfg.download)
        mean, std = MEAN_STD[base]
        val_size = VAL_SIZE
    other_classes = x_test[y_test >= 5]
    num_classes = 10
    if cfg.dataset in ("cifar5", "mnist0-4"):  # CIFAR-5: the first five classes (row 19)
        x, x_test = x[y < 5], x_test[y_test < 5]
        y, y_test = y[y < 5], y_test[y_test < 5]
        num_classes = 5
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    val = order[:val_size]
    train = order[val_size:]
    if cfg.dataset == "mnist5000":  # Deviation (row 11): a fixed subset
        train = train[:5000]
    mean = torch.tensor(mean).view(-1, 1, 1).to(device)  # (C, 1, 1)
    std = torch.tensor(std).view(-1, 1, 1).to(device)
    ood = {}
    for name in cfg.ood:  # the paper's OOD sets (parse_args checks them)
        if name == "notmnist":
            pixels = read_notmnist(cfg.data_root)
        elif name == "noise":  # uniform random pixels, as many as the test set
            pixels = torch.rand(x_test.shape, generator=torch.Generator().manual_seed(3))
        else:  # mnist5-9, cifar5-9: the test set's classes 5-9
            pixels = other_classes
        ood[name] = normalise(pixels, mean, std)
    return Data(train=Split(normalise(x[train], mean, std), y[train].to(device)),
                val=Split(normalise(x[val], mean, std), y[val].to(device)),
                test=Split(normalise(x_test, mean, std), y_test.to(device)),
                num_classes=num_classes, arch="small" if x.shape[1] == 1 else "mednet",
                mean=mean, std=std, ood=ood)

def augment_batch(x, black, shift, flip, generator=None):
    """Each image of x (B, C, H, W) moved up to `shift` pixels on black; flip: half mirrored."""
    B, C, H, W = x.shape
    padded = F.pad(x - black, (shift,) * 4) + black  # (B, C, H + 2 shift, W + 2 shift)
    windows = padded.unfold(2, H, 1).unfold(3, W, 1)  # a view: (B, C, 2s + 1, 2s + 1, H, W)
    dy, dx = torch.randint(0, 2 * shift + 1, (2, B), device=x.device, generator=generator)
    x = windows[torch.arange(B, device=x.device), :, dy, dx]  # (B, C, H, W): image k's window
    if flip:
        coins = torch.rand(B, 1, 1, 1, device=x.device, generator=generator)
        x = torch.where(coins < 0.5, x.flip(-1), x)  # half of them mirrored
    return x

# 8. The training loop ==========================================================================
@dataclasses.dataclass
class TrainState:
    """Where training stands; a checkpoint holds it beside the weights and the optimizers."""
    epoch: int = 0  # epochs finished
    steps: int = 0
    seconds: float = 0.0  # training and validation time
    best_val: float = -1.0  # the best validation accuracy of one network so far
    history: list = dataclasses.field(default_factory=list)  # one entry per epoch

def images_per_step(cfg):
    """A standard ensemble's member walks its own order, b images a step; the others K x b."""
    if cfg.method == "ensemble":
        return cfg.images_per_network
    return cfg.networks_per_step * cfg.images_per_network

def epoch_batches(cfg, n, generator):
    """(steps, K, b) indices of the training images: network k sees batch[k] at each step."""
    K = cfg.networks_per_step
    b = cfg.images_per_network
    steps = n // images_per_step(cfg)
    if cfg.method == "ensemble":  # K orders, one a member (row 20)
        orders = [torch.randperm(n, generator=generator) for _ in range(K)]
        orders = torch.stack(orders)[:, :steps * b]  # (K, steps * b)
        return orders.view(K, steps, b).transpose(0, 1)  # (steps, K, b)
    order = torch.randperm(n, generator=generator)  # one order (row 5)
    return order[:steps * K * b].view(steps, K, b)

def train(cfg, model, D, net, data, opt, state):
    """The training loop; after each epoch, validation, Fig. 7's diversity and the checkpoints."""
    x_train, y_train = data.train
    steps = len(x_train) // images_per_step(cfg)
    if steps == 0:
        raise UserError(f"the training set ({len(x_train)} images) is smaller than one step")
    names = STATS if D is not None else LIKELIHOOD_STATS
    log_every = max(1, steps // 5)  # reading the losses waits for the GPU: 5 an epoch
    black = -data.mean / data.std  # a black pixel, normalised: a shifted image's border
    flip = x_train.shape[1] == 3  # CIFAR: half of the images mirrored too
    print(f"{'epoch':>5} {'step':>7}", *(f"{name:>8}" for name in names), " ms/step     ETA")
    for epoch in range(state.epoch, cfg.epochs):
        epoch_start = time.perf_counter()
        model.train()
        rng = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # resume: the same epoch
        batches = epoch_batches(cfg, len(x_train), rng).to(x_train.device)
        sums, n_sum, log_start = 0, 0, time.perf_counter()
        for i, idx in enumerate(batches):  # idx: (K, b)
            x = x_train[idx]  # (K, b, C, H, W): network k's images x[k]
            if cfg.shift:
                x = augment_batch(x.flatten(0, 1), black, cfg.shift, flip).view_as(x)
            if D is None:
                stats = likelihood_step(model, net, opt, x, y_train[idx])
            else:
                stats = hypergan_step(model, D, net, opt, x, y_train[idx], cfg.beta,
                                      repulsion_weight=cfg.repulsion)
            opt.schedule.step()
            sums, n_sum = sums + stats, n_sum + 1
            if (i + 1) % log_every and i + 1 < steps:
                continue
            means = dict(zip(names, (sums / n_sum).tolist()))  # waits for the device
            if not all(map(math.isfinite, means.values())):
                raise UserError(f"a loss became non-finite at epoch {epoch + 1}, step {i + 1} "
                                f"({means}); lower --lr or --beta; the checkpoint is kept")
            ms = (time.perf_counter() - log_start) * 1000 / n_sum
            eta = ms / 60000 * (steps * (cfg.epochs - epoch) - i - 1)  # minutes
            print(f"{epoch + 1:>5} {epoch * steps + i + 1:>7}",
                  *(f"{v:8.4f}" for v in means.values()), f"{ms:8.1f} {eta:6.1f}m", flush=True)
            sums, n_sum, log_start = 0, 0, time.perf_counter()
        state.epoch = epoch + 1
        state.steps += steps
        probs = sample_probs(model, net, data.val.x, VAL_NETWORKS)
        val = evaluate(probs, data.val.y, sizes=())
        state.seconds += time.perf_counter() - epoch_start  # training and validation
        div = diversity(model, net, data.test.x[:1000])  # observes, chooses nothing
        warning = None  # from epoch 2, a validation accuracy within 2 points of chance
        if state.epoch >= 2 and val["single_mean"] <= 1 / data.num_classes + 0.02:
            warning = (f"validation accuracy {val['single_mean']:.1%}, near chance: not learning; "
                       "lower --lr-d or --beta (D overpowers Eq. (1)), or try --lr, --lr-spread")
        state.history.append(dict(epoch=state.epoch, train=means, diversity=div, warning=warning,
                                  seconds=state.seconds, val_single_mean=val["single_mean"]))
        improved = val["single_mean"] > state.best_val
        if improved:  # first: a checkpoint.pt never counts a best.pt not written
            state.best_val = val["single_mean"]
            save_checkpoint(os.path.join(cfg.out_dir, "best.pt"), cfg, model, D, opt, state)
        save_checkpoint(os.path.join(cfg.out_dir, "checkpoint.pt"), cfg, model, D, opt, state)
        print(f"epoch {state.epoch}: validation {val['single_mean']:.2%} ± {val['single_std']:.2%} "
              f"(one network); weight-norm RSD {div['weight_norm_rsd_mean']:.4f}; test "
              f"disagreement {div['disagreement']:.2%}" + "  -> best.pt" * improved, flush=True)
        if warning:
            print(f"warning: {warning}", flush=True)

# 9. Evaluation: Table 2 (accuracy of 1, 5, 10, 100 networks) and Fig. 7 (diversity) ============
@contextlib.contextmanager
def sampling(model, seed=EVAL_SEED):
    """The same networks each time (torch's generators from `seed`); BatchNorm in eval (row 9)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
    model.train(was_training)

def progress(name, items, every=10.0):
    """Yields the items of a long phase; every 10 s prints 'name: done/total, ETA'."""
    start = last = time.perf_counter()
    for done, item in enumerate(items):
        if time.perf_counter() - last >= every:
            last = time.perf_counter()
            eta = (last - start) * (len(items) / done - 1)
            print(f"  {name}: {done}/{len(items)}, ETA {eta:.0f} s", flush=True)
        yield item

@torch.no_grad()
def images_that_fit(net, x, networks, most):
    """How many images of x `networks` networks run at once within MEMORY_BUDGET, at most `most`."""
    h = x[:1].float()
    floats = 0  # every layer's output for one image
    for layer in net:
        h = h if isinstance(layer, nn.Dropout) else layer(h)  # no mask: no random numbers
        floats += h.numel()
    image_bytes = networks * 2 * 4 * floats  # twice (temporaries, or gradients), 4 bytes a float
    return max(1, min(most, MEMORY_BUDGET // image_bytes))

def sample_chunks(model, n, net):
    """theta of n networks, chunks within MEMORY_BUDGET; all the noise first: the same networks."""
    if not isinstance(model, HyperGAN):  # a baseline's networks are views: no memory
        return [model.sample(n)]
    network_bytes = 4 * 4 * sum(p.numel() for p in net.parameters())  # 4 bytes, 4 times in G_i
    noise = model.sample_s(n).split(max(1, MEMORY_BUDGET // network_bytes))
    return (model.generate(model.codes(s)) for s in noise)

@torch.no_grad()
def predict(net, theta, x):
    """Softmax outputs (n, len(x), classes) of the networks theta, chunks within MEMORY_BUDGET."""
    most_networks, most_images = 100, 500  # the fastest on a GPU
    if x.device.type == "cpu":
        most_networks, most_images = 10, 50  # on a CPU
    networks = min(most_networks, len(theta[0][0]))
    images = images_that_fit(net, x, networks, most_images)
    out = []
    for first in progress(f"chunks of {networks} networks", range(0, len(theta[0][0]), networks)):
        last = first + networks
        chunk = [(w[first:last], b[first:last]) for w, b in theta]
        probs = [functional_forward(net, chunk, part, shared=True).float().softmax(-1)
                 for part in x.split(images)]
        out.append(torch.cat(probs, dim=1))  # (networks, len(x), classes)
    return torch.cat(out)

@torch.no_grad()
def sample_probs(model, net, x, n_networks):
    """Softmax outputs (n, len(x), classes) of n networks sampled from `model` with EVAL_SEED."""
    with sampling(model):
        chunks = sample_chunks(model, n_networks, net)
        return torch.cat([predict(net, theta, x) for theta in chunks])

def disagreement(probs):
    """The share of network pairs that disagree: with c_j of M voting j, (M^2 - sum c_j^2) / 2 of
    M (M - 1) / 2 pairs; the mean over the images."""
    M = len(probs)
    predicted = F.one_hot(probs.argmax(-1), probs.shape[-1])  # (M, images, classes)
    votes = predicted.sum(0).float()  # (images, classes)
    disagreeing = M * M - votes.pow(2).sum(-1)  # ordered pairs, an image
    return (disagreeing / (M * (M - 1))).mean().item()

def evaluate(probs, y, sizes=(1, 5, 10, 100)):
    """Table 2 from the softmax outputs probs (n, images, classes) of n networks: one network's
    accuracy (mean, std over the n); accuracy, NLL and ECE of ensembles (mean softmax, row 12) of
    each size m over disjoint groups of m, mean and std over the groups (row 13; None if n < m)."""
    n = len(probs)
    single = (probs.argmax(-1) == y).float().mean(1)  # (n,)
    keys = list(map(str, sizes))
    r = dict(single_mean=single.mean().item(), single_std=0.0, disagreement=None,
             ensemble=dict.fromkeys(keys), nll=dict.fromkeys(keys), ece=dict.fromkeys(keys))
    if n > 1:
        r["single_std"] = single.std().item()
        r["disagreement"] = disagreement(probs[:100])
    for m, key in zip(sizes, keys):
        groups = n // m
        if groups == 0:
            continue
        members = probs[:groups * m].unflatten(0, (groups, m))  # (groups, m, images, C)
        p = members.mean(1)  # each group's mean softmax: (groups, images, C)
        accuracy = (p.argmax(-1) == y).float().mean(1)  # (groups,)
        std = accuracy.std().item() if groups > 1 else 0.0
        r["ensemble"][key] = dict(mean=accuracy.mean().item(), std=std, draws=groups)
        log_p = p.clamp_min(1e-12).log().flatten(0, 1)  # (groups * images, C)
        r["nll"][key] = F.nll_loss(log_p, y.repeat(groups)).item()
        r["ece"][key] = calibration_error(p, y).mean().item()
    return r

def calibration_error(p, y, bins=15):
    """ECE (Guo et al., 2017) of each ensemble's softmax p (groups, images, C): the images fall
    into 15 equal bins of confidence max_c p; sum over bins of |accuracy - confidence| x share."""
    confidence, predicted = p.max(-1)  # (groups, images)
    gap = confidence - (predicted == y).float()  # per image
    bin_of = (confidence * bins).long().clamp_max(bins - 1)  # 0 .. bins-1
    per_bin = p.new_zeros(len(p), bins).scatter_add_(1, bin_of, gap)
    return per_bin.abs().sum(1) / len(y)  # (groups,)

@torch.no_grad()
def diversity(model, net, x, n_networks=100, n_predicting=20):
    """Fig. 7: std / mean over n networks of each layer's weight norm; row 28: disagreement on x."""
    with sampling(model):
        theta = model.sample(n_networks)
        norms = [w.flatten(1).float().norm(dim=1) for w, _ in theta]  # (n,) a layer
        rsd = [(norm.std() / norm.mean()).item() for norm in norms]
        first = [(w[:n_predicting], b[:n_predicting]) for w, b in theta]
        probs = predict(net, first, x)
    return dict(weight_norm_rsd=rsd, weight_norm_rsd_mean=sum(rsd) / len(rsd),
                disagreement=disagreement(probs))

PAPER_TABLE2 = {  # HyperGAN's rows of the paper's Table 2 (PAPER.md 5.1), accuracy %
    "mnist": {"1": "98.64 ± .3", "5": "98.75 ± .3", "10": "99.22 ± .09", "100": "99.31 ± .02"},
    "mnist5000": {"1": "96.69 ± .3", "5": "97.24 ± .14", "10": "97.33 ± .1", "100": "97.71 ± .05"},
    "cifar5": {"1": "84.50 ± .6", "5": "85.51 ± .2", "10": "85.54 ± .2", "100": "85.81 ± .02"},
    "cifar10": {"1": "76.32 ± .3", "5": "76.84 ± .1", "10": "77.52 ± .09", "100": "77.71 ± .03"},
}

def test_results(cfg, model, net, data, state):
    """Table 2 on the test set, printed beside the paper's rows, and results for a program."""
    start = time.perf_counter()
    probs = sample_probs(model, net, data.test.x, cfg.eval_networks)  # (n, images, C)
    r = evaluate(probs, data.test.y)
    eval_seconds = time.perf_counter() - start
    print(f"\ntest set, {len(probs)} networks ({eval_seconds:.1f} s); pairwise disagreement "
          f"{r['disagreement'] or 0:.2%}\n networks | accuracy % (std) |    NLL |    ECE | paper")
    paper = PAPER_TABLE2.get(cfg.dataset, {})
    for m, e in r["ensemble"].items():  # std: over single networks for size 1, else over groups
        ours = "" if e is None else (f"{e['mean']:9.2%} ± {e['std']:.2%} | "
                                     f"{r['nll'][m]:.4f}  | {r['ece'][m]:.4f}")
        print(f"{m:>9} | {ours:36s} | {paper.get(m, '-')}")
    single = r["single_mean"]
    e100 = r["ensemble"]["100"]
    accuracy = dict(single_mean=single, single_std=r["single_std"], ensemble=r["ensemble"])
    return dict(dataset=cfg.dataset, method=cfg.method, config=vars(cfg), accuracy=accuracy,
                nll=r["nll"], ece=r["ece"], disagreement=r["disagreement"],
                ensemble_gain=e100 and e100["mean"] - single, train_seconds=state.seconds,
                steps_per_second=state.steps / state.seconds, eval_seconds=eval_seconds,
                history=state.history, warning=state.history[-1]["warning"])  # the last epoch's

# 10. Uncertainty (PAPER.md 5.3, 5.4): OOD and adversarial detection by the entropy of 10 networks
def entropy(p):  # in nats, over the last axis
    return -(p * p.clamp_min(1e-12).log()).sum(-1)

def auroc(neg, pos):
    """P(a random positive scores above a random negative), ties 1/2: Mann-Whitney U."""
    scores = torch.cat([neg, pos]).double().cpu()
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ranks = (counts.cumsum(0) - (counts - 1) / 2)[inverse]  # 1-based; ties share
    positives = ranks[len(neg):].sum()  # the sum of the positives' ranks
    u = positives - len(pos) * (len(pos) + 1) / 2
    return (u / (len(neg) * len(pos))).item()

def fpr_at_95_tpr(neg, pos):
    """The share of negatives flagged (score >= t) at the highest t that flags 95 % of positives."""
    ranked = pos.sort(descending=True).values
    threshold = ranked[math.ceil(0.95 * len(pos)) - 1]
    return (neg >= threshold).float().mean().item()

def detection(neg_probs, pos_probs):
    """Detection by the entropy of the mean softmax; ecdf: its quantiles (the paper's plot)."""
    e_in = entropy(neg_probs)
    e_out = entropy(pos_probs)
    q = torch.linspace(0, 1, 101, device=neg_probs.device)
    ecdf = dict(quantiles=q.tolist(), entropy_in=e_in.quantile(q).tolist(),
                entropy_out=e_out.quantile(q).tolist())
    return dict(auroc=auroc(e_in, e_out), fpr95=fpr_at_95_tpr(e_in, e_out), ecdf=ecdf,
                entropy_in_mean=e_in.mean().item(), entropy_out_mean=e_out.mean().item())

def ensemble_log_probs(net, theta, x):
    """log of the M networks' mean softmax (B, classes), differentiable in x."""
    logits = functional_forward(net, theta, x, shared=True)  # (M, B, classes)
    log_p = logits.float().log_softmax(-1)
    return torch.logsumexp(log_p, 0) - math.log(len(log_p))

@torch.no_grad()
def ensemble_probs(net, theta, x):
    """The ensemble's mean softmax (B, classes), at most 200 images at a time."""
    chunk = images_that_fit(net, x, len(theta[0][0]), 200)
    return torch.cat([ensemble_log_probs(net, theta, part).exp()
                      for part in x.split(chunk)])

def attack(net, theta, x, y, eps, steps, data, generator=None, resample=None):
    """White-box L-inf attack on the ensemble's NLL, in [0, 1] pixels: steps of alpha along the
    gradient's sign, clipped to the eps-ball. steps 1: FGSM; more: PGD from a random start, alpha
    2.5 eps / steps; resample(n): new networks each step. Deviation (row 26): not foolbox's."""
    pixels = x * data.std + data.mean  # back to [0, 1]
    adv = pixels.clone()
    alpha = eps
    if steps > 1:
        noise = torch.rand(pixels.shape, device=x.device, generator=generator) * 2 - 1
        adv = (pixels + eps * noise).clamp(0, 1)
        alpha = 2.5 * eps / steps
    for _ in range(steps):
        members = theta if resample is None else resample(len(theta[0][0]))
        adv.requires_grad_(True)
        log_probs = ensemble_log_probs(net, members, (adv - data.mean) / data.std)
        gradient = torch.autograd.grad(F.nll_loss(log_probs, y), adv)[0]
        adv = adv.detach() + alpha * gradient.sign()
        adv = adv.clamp(pixels - eps, pixels + eps).clamp(0, 1)  # the ball, then [0, 1]
    return (adv - data.mean) / data.std

def attack_scores(clean, p_adv, y):
    """Accuracy under an attack, the share of right answers it flips, their detection (row 27)."""
    correct = clean.argmax(-1) == y
    flipped = correct & (p_adv.argmax(-1) != y)
    r = dict(accuracy=(p_adv.argmax(-1) == y).float().mean().item(), auroc=None, fpr95=None,
             success_rate=(flipped.sum() / correct.sum().clamp(1)).item())
    if flipped.any():
        d = detection(clean[correct], p_adv[flipped])
        r.update(auroc=d["auroc"], fpr95=d["fpr95"])
    return r

def adversarial_evaluation(net, theta, data, model):
    """FGSM and PGD on theta; HyperGAN's also PGD on new networks every step (official HyperBIM)."""
    x = data.test.x[:ADV_IMAGES]
    y = data.test.y[:ADV_IMAGES]
    starts = torch.Generator(x.device).manual_seed(EVAL_SEED + 2)  # PGD's random starts
    clean = ensemble_probs(net, theta, x)
    accuracy = (clean.argmax(-1) == y).float().mean().item()
    result = dict(networks=len(theta[0][0]), images=len(x), clean_accuracy=accuracy)
    attacks = dict(fgsm=(1, None), pgd=(PGD_STEPS, None))
    if isinstance(model, HyperGAN):  # new networks, with noise of their own
        attacks["pgd_fresh"] = (PGD_STEPS, model.sample)
    chunk = images_that_fit(net, x, len(theta[0][0]), 100)  # images attacked at once
    for name, (steps, fresh) in attacks.items():
        result[name] = {}
        with sampling(model, EVAL_SEED + 1) if fresh else contextlib.nullcontext():
            for eps in EPSILONS:
                adv = [attack(net, theta, part, labels, eps, steps, data, starts, fresh)
                       for part, labels in zip(x.split(chunk), y.split(chunk))]
                r = attack_scores(clean, ensemble_probs(net, theta, torch.cat(adv)), y)
                result[name][str(eps)] = r
                detected = "-" if r["auroc"] is None else f"{r['auroc']:.3f}"
                print(f"  {name:9s} eps {eps}: accuracy {r['accuracy']:6.1%}, "
                      f"detection AUROC {detected}", flush=True)
    return result

def uncertainty_evaluation(cfg, model, net, data):
    """OOD detection and, with --adversarial, the attacks, by one ensemble (rows 22-24)."""
    out = dict(ood={}) if cfg.ood else {}
    with sampling(model):  # the networks, and MC dropout's masks
        with torch.no_grad():  # the baselines' sample keeps the graph
            theta = model.sample(UQ_NETWORKS)
        if cfg.ood:
            p_in = ensemble_probs(net, theta, data.test.x)
        for name, x_ood in data.ood.items():
            r = detection(p_in, ensemble_probs(net, theta, x_ood))
            out["ood"][name] = r
            print(f"ood {name:12s} AUROC {r['auroc']:.4f}, FPR at 95 % TPR {r['fpr95']:.4f}")
        if cfg.adversarial:
            out["adversarial"] = adversarial_evaluation(net, theta, data, model)
    return out

# 11. The 1D toy (PAPER.md 5.5): networks fit to 20 points agree on them, spread apart elsewhere
def run_toy(cfg, device):
    """Fit y = x^3 + N(0, 3^2) at 20 points in [-4, 4] (official V1; Deviation (row 30): with D)."""
    g = torch.Generator().manual_seed(1)
    inner = torch.rand(18, generator=g) * 8 - 4
    x = torch.cat([inner, torch.tensor([-4.0, 4.0])])  # 18 points, and the two ends
    y = (x.pow(3) + 3 * torch.randn(20, generator=g)).to(device)
    x = x.to(device)
    # Deviation (row 30): targets divided by their std (about 40): an MSE of order 1, as a CE
    scale = y.std()
    start = time.perf_counter()
    net, model, D = build(cfg, "toy", 1, device)
    opt = make_optimizers(model, D, cfg, cfg.epochs)
    if cfg.mixer:
        pretrain_mixer(model)
    K = cfg.networks_per_step
    inputs = x.view(1, 20, 1).expand(K, 20, 1)  # all 20 points, K times
    targets = (y / scale).expand(K, 20)
    for step in range(1, cfg.epochs + 1):
        stats = hypergan_step(model, D, net, opt, inputs, targets, cfg.beta, regression_loss)
        opt.schedule.step()
        if step % max(1, cfg.epochs // 5) == 0:
            print(f"toy: step {step:5d} of {cfg.epochs}, MSE {stats[0]:.4f}", flush=True)
    seconds = time.perf_counter() - start
    grid = torch.linspace(-6, 6, 241, device=device)
    with torch.no_grad(), sampling(model):
        theta = model.sample(100)
        pred = functional_forward(net, theta, torch.cat([grid, x]).unsqueeze(1), shared=True)
    pred = pred.squeeze(-1) * scale  # (100 networks, 241 + 20 inputs)
    on_grid, on_data = pred.split([241, 20], dim=1)
    std = on_grid.std(0)
    inside = grid.abs() <= 4
    toy = dict(networks=100, x=grid.tolist(), std=std.tolist(), mean=on_grid.mean(0).tolist(),
               train_x=x.tolist(), train_y=y.tolist(),
               train_mse=(on_data.mean(0) - y).pow(2).mean().item(),
               spread_inside=std[inside].mean().item(), spread_outside=std[~inside].mean().item())
    print(f"toy: {seconds:.1f} s; the mean's MSE on the points {toy['train_mse']:.2f} (noise: 9); "
          f"spread inside [-4, 4] {toy['spread_inside']:.2f}, outside {toy['spread_outside']:.2f}")
    results = dict(dataset="toy", config=vars(cfg), train_seconds=seconds, toy=toy)
    write_results(cfg, results)
    return results

# 12. Files: paths checked first, one run an --out-dir, never half a file, an exact resume =====
OUTPUTS = ("checkpoint.pt", "best.pt", "results.json", "diversity.png", "entropy_cdf.png",
           "toy.png")
ARCH_OPTIONS = ("dataset", "method", "hidden", "mixer")  # must match to load a checkpoint
TRAINING_OPTIONS = ("seed", "networks_per_step", "images_per_network", "shift", "init_spread",
                    "lr", "lr_spread", "lr_d", "beta", "repulsion")  # must match, to resume

@contextlib.contextmanager
def claimed_paths(cfg):
    """Checks files and folders before any long work; then holds --out-dir (run.lock) to the end."""
    if os.environ.get("WORLD_SIZE", "1") != "1":  # torchrun: one device a run (paper_notes.md)
        raise UserError("one process trains one run, on one device; start it with `python "
                        "hypergan.py`, not torchrun or another launcher of several processes")
    folders = {"--out-dir": cfg.out_dir}
    if cfg.export:
        folders["--export PATH"] = cfg.export[1]
    for option, folder in folders.items():
        try:
            os.makedirs(folder, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()  # can this process write there?
        except OSError as e:
            raise UserError(f"{option} {folder!r} is not a writable folder ({e!r:.100})")
    lock = os.path.join(cfg.out_dir, "run.lock")
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # atomic: one run wins
    except FileExistsError:
        raise UserError(f"another run is writing into --out-dir {cfg.out_dir!r} (its run.lock; "
                        "if no run is, delete that file)") from None
    try:  # the rest of the checks, under the lock
        taken = [name for name in OUTPUTS if os.path.exists(os.path.join(cfg.out_dir, name))]
        if cfg.resume and "checkpoint.pt" not in taken:
            raise UserError(f"--resume: there is no checkpoint.pt in --out-dir {cfg.out_dir!r}")
        if taken and not cfg.resume:
            advice = "" if cfg.eval_only else ", or --resume to continue that run"
            raise UserError(f"--out-dir {cfg.out_dir!r} already holds {', '.join(taken)} of "
                            f"another run; pass a new --out-dir{advice}")
        if cfg.export and any(name.startswith("net_") for name in os.listdir(cfg.export[1])):
            raise UserError(f"--export PATH {cfg.export[1]!r} already holds exported networks; "
                            "pass a new folder")
        yield
    finally:
        Path(lock).unlink(missing_ok=True)

@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary name, renamed to `path` once written: never half a file, the old kept."""
    tmp = path + ".tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        raise UserError(f"could not write {path!r} ({e!r:.80}); older files are kept: once there "
                        "is room, --resume continues the run from its last checkpoint") from None
    finally:
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)

def save_checkpoint(path, cfg, model, D, opt, state):
    rng_cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    ckpt = dict(format=CHECKPOINT_FORMAT, config=vars(cfg), model=model.state_dict(),
                D=D and D.state_dict(), opt_g=opt.g.state_dict(), opt_d=D and opt.d.state_dict(),
                sched=opt.schedule.state_dict(), rng_cpu=torch.get_rng_state(),
                rng_cuda=rng_cuda, **dataclasses.asdict(state))
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)

def load_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        version = ckpt["format"]  # fails on anything but a checkpoint's dict
    except Exception as e:
        raise UserError(f"{path!r} is not a readable HyperGAN checkpoint ({e!r:.100})")
    if version != CHECKPOINT_FORMAT:
        raise UserError(f"{path!r} has checkpoint format {version}, not {CHECKPOINT_FORMAT}")
    return ckpt

def restore(ckpt, path, cfg, model, D, opt, state, resume):
    """Loads weights and state; to resume also optimizers and random state, at the same options."""
    for key in ARCH_OPTIONS + (TRAINING_OPTIONS if resume else ()):
        trained_with = ckpt["config"].get(key)
        if trained_with != getattr(cfg, key):
            raise UserError(f"{path!r} was trained with --{key.replace('_', '-')} {trained_with}, "
                            f"this run has {getattr(cfg, key)}")
    modules = {"model": model, "D": D}
    if resume:
        modules.update(opt_g=opt.g, opt_d=opt.d, sched=opt.schedule)
    try:
        for key, module in modules.items():
            if module is not None:
                module.load_state_dict(ckpt[key])
        vars(state).update({key: ckpt[key] for key in vars(state)})  # epoch, steps, ...
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise UserError(f"{path!r} does not match this model ({e!r:.100})")
    if resume:
        torch.set_rng_state(ckpt["rng_cpu"])
        if ckpt["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng_cuda"][:torch.cuda.device_count()])

@torch.no_grad()
def export_networks(model, net, n, path):
    """path/net_000.pt, ...: state_dicts of `net`, a target without dropout; returns how many."""
    names = [name for name, _ in net.named_parameters()]
    k = 0
    with sampling(model):
        for theta in sample_chunks(model, n, net):
            tensors = [t for pair in theta for t in pair]  # in the order of named_parameters
            for network in zip(*tensors):  # one network's tensors
                state_dict = {name: t.float().cpu().clone() for name, t in zip(names, network)}
                with atomic_path(os.path.join(path, f"net_{k:03d}.pt")) as tmp:
                    torch.save(state_dict, tmp)
                k += 1
    return k

def write_results(cfg, results):
    """results.json, then the PNG figures that the results allow."""
    path = os.path.join(cfg.out_dir, "results.json")
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    if not cfg.figures:
        return
    try:
        from matplotlib.figure import Figure  # drawn into files, never a window (no pyplot)
    except ImportError:
        print("figures: skipped, matplotlib is not installed")
        return
    ood = {name: r["ecdf"] for name, r in results.get("ood", {}).items()}
    figures = dict(diversity=(diversity_figure, results.get("history")),
                   entropy_cdf=(entropy_figure, ood), toy=(toy_figure, results.get("toy")))
    for name, (draw, drawn) in figures.items():
        if not drawn:  # the results hold nothing for this figure
            continue
        fig = Figure(figsize=(5, 4))
        draw(fig.subplots(), cfg.method, drawn)
        png = os.path.join(cfg.out_dir, f"{name}.png")
        with atomic_path(png) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        print(f"figure: {png}")

def diversity_figure(ax, method, history):
    """Fig. 7: the weight norms' spread over the epochs (the disagreement: the epoch lines)."""
    epochs = [e["epoch"] for e in history]
    ax.plot(epochs, [e["diversity"]["weight_norm_rsd_mean"] for e in history], marker=".")
    ax.set(xlabel="epoch", title=f"{method}: std / mean of the weights' L2 norms (Fig. 7)")

def entropy_figure(ax, method, ood):
    """The paper's entropy CDFs: the test images against each OOD set (name -> ecdf)."""
    for name, ecdf in ood.items():
        ax.plot(ecdf["entropy_out"], ecdf["quantiles"], label=name)
    ax.plot(ecdf["entropy_in"], ecdf["quantiles"], "k--", label="test (in distribution)")
    ax.set(xlabel="entropy of the mean softmax (nats)", title=f"{method}: fraction of inputs")
    ax.legend()

def toy_figure(ax, method, toy):
    """The networks' predictive spread on the 1D toy."""
    mean = torch.tensor(toy["mean"])
    std = torch.tensor(toy["std"])
    ax.fill_between(toy["x"], mean - 2 * std, mean + 2 * std, alpha=0.3)
    ax.plot(toy["x"], toy["mean"])
    ax.plot(toy["x"], [v**3 for v in toy["x"]], "k--")
    ax.plot(toy["train_x"], toy["train_y"], "k.")
    title = f"1D toy, {method}: mean ± 2 std, x³ (dashed), data"
    ax.set(xlabel="x", ylim=(-250, 250), title=title)

def peak_memory_mb(device):
    """The GPU allocator's peak, or the process's peak resident memory (Linux: KiB, macOS: B)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    if sys.platform == "win32":  # no `resource` module there
        return None
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024

# 13. The command line and main: check the input, load the data, train, evaluate, write ==========
class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message} (see --help)")  # one line instead of argparse's usage block

def number(kind, low, high):
    """An argparse type: a `kind` (int or float) from low to high, else a one-line error."""
    def number(text):  # not a number: argparse says "invalid number value"
        value = kind(text)
        if not low <= value <= high:  # also false for nan
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {text!r}")
        return value
    return number

def parse_args(argv=None):
    """The options, with the data set's recipe filled in; every check that needs no file."""
    recipes = [f"  {name}: {recipe}" for name, recipe in {**RECIPES, **METHOD_RECIPES}.items()]
    recipes.insert(0, "recipes, the defaults of the options they name (a --method's first):")
    p = ArgumentParser(description="HyperGAN (Ratzlaff & Fuxin, ICML 2019): train, evaluate",
                       epilog="\n".join(recipes), formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=list(RECIPES),
                   help="mnist0-4: for --ood mnist5-9; synthetic-*: offline stand-ins")
    p.add_argument("--method", default="hypergan", choices=["hypergan", *METHOD_RECIPES],
                   help="HyperGAN or a baseline of Table 2")
    p.add_argument("--data-root", default="./data", help="folder that holds (or gets) the data")
    p.add_argument("--no-download", dest="download", action="store_false", help="never download")
    p.add_argument("--out-dir", default="", help="a new folder (default: runs/DATASET-METHOD)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
                   help="auto: cuda, then mps, then cpu")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0, help="seed of training")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir")
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint, no training")
    p.add_argument("--checkpoint", default="", help="the checkpoint that --eval-only evaluates")
    p.add_argument("--export", nargs=2, metavar=("N", "PATH"),
                   help="write N sampled networks as state_dicts into folder PATH")
    p.add_argument("--synthetic-size", type=number(int, 64, 10**6), default=4096,
                   help="training images of the synthetic sets (default: 4096)")
    # the recipe's options (defaults: the recipes at the end of --help)
    p.add_argument("--epochs", type=number(int, 1, 10**6), help="passes over the training set")
    p.add_argument("--networks-per-step", type=number(int, 2, 4096),  # Q and G use BatchNorm
                   help="K, networks sampled a step")
    p.add_argument("--images-per-network", type=number(int, 1, 4096),
                   help="b, images a network sees a step")
    p.add_argument("--shift", type=number(int, 0, 8), help="pixels an image moves (CIFAR: flips)")
    p.add_argument("--init-spread", type=number(float, 0, 1e3), help="initial spread (row 3)")
    p.add_argument("--lr", type=number(float, 1e-12, 1), default=1e-3,
                   help="Adam rate of Q and the G_i, cosine-decayed to 0 (default: 1e-3)")
    p.add_argument("--lr-spread", type=number(float, 0, 1e3),
                   help="rate of W in G_i's last layer, as a multiple of --lr (row 7)")
    p.add_argument("--lr-d", type=number(float, 1e-12, 1), default=1e-3,
                   help="Adam rate of D (default: 1e-3; official code: 1e-4)")
    p.add_argument("--beta", type=number(float, 0, 1e4), default=1.0,
                   help="weight of Eq. (3) in Eq. (2); 0: the no-D ablation (default: 1)")
    p.add_argument("--hidden", type=number(int, 2, 4096), default=256,
                   help="width of Q, the G_i and D (default: 256; official: 512, row 4)")
    p.add_argument("--no-mixer", dest="mixer", action="store_false", help="no Q (Fig. 7, row 29)")
    p.add_argument("--repulsion", type=number(float, 0, 1e4), default=0.0,
                   help="beyond the paper: weight of `repulsion` in Eq. (2) (default: 0)")
    p.add_argument("--eval-networks", type=number(int, 1, 1000), default=300,  # 400 MB of outputs
                   help="networks sampled on the test set (default: 300)")
    p.add_argument("--ood", default="", help="OOD sets, comma-separated: " + ", ".join(OOD_SETS))
    p.add_argument("--adversarial", action="store_true", help="FGSM and PGD, and their detection")
    p.add_argument("--no-figures", dest="figures", action="store_false", help="draw no figures")
    cfg = p.parse_args(argv)
    recipe = {**RECIPES[cfg.dataset], **METHOD_RECIPES.get(cfg.method, {})}
    for key, value in recipe.items():  # an option not given takes the recipe's value
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    cfg.out_dir = cfg.out_dir or f"runs/{cfg.dataset}-{cfg.method}"
    cfg.ood = [name for name in cfg.ood.split(",") if name]
    for name in cfg.ood:
        home = {"mnist5-9": "mnist0-4", "cifar5-9": "cifar5"}.get(name, cfg.dataset)
        if name not in OOD_SETS:
            raise UserError(f"unknown --ood set {name!r}; choose from {', '.join(OOD_SETS)}")
        if home != cfg.dataset:
            raise UserError(f"--ood {name} needs --dataset {home}")
        if name == "notmnist" and "mnist" not in cfg.dataset:  # MNIST's images only
            raise UserError(f"--ood notmnist holds (1, 28, 28) images, unlike {cfg.dataset}'s")
    if cfg.eval_only != bool(cfg.checkpoint) or (cfg.resume and cfg.eval_only):
        raise UserError("--checkpoint and --eval-only go together; to continue a run, pass its "
                        "--out-dir and --resume")
    image_options = cfg.resume or cfg.eval_only or cfg.ood or cfg.adversarial or cfg.export
    if cfg.dataset == "toy" and (image_options or cfg.repulsion or cfg.method != "hypergan"):
        raise UserError("--dataset toy trains HyperGAN on 20 points: --method, --resume, "
                        "--eval-only, --ood, --adversarial, --export and --repulsion need images")
    if cfg.repulsion and cfg.method != "hypergan":
        raise UserError("--repulsion needs --method hypergan")
    if cfg.export:
        count, folder = cfg.export
        if not (count.isdecimal() and 1 <= int(count) <= 10**4):
            raise UserError(f"--export N PATH needs N from 1 to 10000 networks, got {count!r}")
        cfg.export = [int(count), folder]
    return cfg

def pick_device(name):
    """--device: auto is cuda, then mps, then cpu."""
    available = dict(cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available())
    if name == "auto":
        name = "cuda" if available["cuda"] else "mps" if available["mps"] else "cpu"
    if name != "cpu" and not available[name]:
        raise UserError(f"--device {name} is not available here; use --device auto")
    return torch.device(name)

def main(argv=None):
    """The command line; every failure ends as one `error:` line and exit code 2."""
    try:
        cfg = parse_args(argv)
        with claimed_paths(cfg):
            return run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
    except (KeyboardInterrupt, BrokenPipeError) as e:  # Ctrl-C; the reader stopped (`| head`)
        if isinstance(e, BrokenPipeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no more output
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else "the output closed"
        print(f"error: {what}; files already written are kept, and a training run continues "
              "from its last finished epoch with --resume", file=sys.stderr)
    sys.exit(2)

@contextlib.contextmanager
def out_of_memory_is_an_error(phase, checkpoint):
    """Out of memory in `phase` ends the run as one line, which says what to do."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:  # = torch.OutOfMemoryError from torch 2.5
        raise UserError(f"out of memory in {phase}; the files written so far are kept: evaluate "
                        f"{checkpoint!r} again with --eval-only --checkpoint and a new --out-dir "
                        "(a lower MEMORY_BUDGET in hypergan.py, or --device cpu)") from None

def run(cfg):
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)  # the CPU and GPU generators; data splits have their own
    if cfg.dataset == "toy":
        return run_toy(cfg, device)
    ckpt_path = cfg.checkpoint or os.path.join(cfg.out_dir, "checkpoint.pt")
    ckpt = load_checkpoint(ckpt_path) if cfg.eval_only or cfg.resume else None
    if cfg.eval_only:  # how it was trained (the standard ensemble: its members)
        for key in TRAINING_OPTIONS + ("epochs",):
            setattr(cfg, key, ckpt["config"][key])
    data = load_data(cfg, device)
    net, model, D = build(cfg, data.arch, data.num_classes, device)
    print(f"{cfg.method} on {cfg.dataset}: {len(data.train.x)} training images, {device}")
    steps = len(data.train.x) // images_per_step(cfg) * cfg.epochs
    opt = make_optimizers(model, D, cfg, max(1, steps))
    state = TrainState()
    best = cfg.checkpoint or os.path.join(cfg.out_dir, "best.pt")
    if ckpt is not None:
        restore(ckpt, ckpt_path, cfg, model, D, opt, state, resume=cfg.resume)
        print(f"resumed from {ckpt_path} after epoch {state.epoch}" if cfg.resume else
              f"loaded {ckpt_path}")
    with out_of_memory_is_an_error("training", best):
        if ckpt is None and D is not None and cfg.mixer:
            loss = pretrain_mixer(model)
            print(f"mixer pre-training: {PRETRAIN_STEPS} steps, moment-matching loss {loss:.4f}")
        if not cfg.eval_only:
            train(cfg, model, D, net, data, opt, state)
            model.load_state_dict(load_checkpoint(best)["model"])
    with out_of_memory_is_an_error("evaluation", best):
        results = test_results(cfg, model, net, data, state)
        results.update(uncertainty_evaluation(cfg, model, net, data))
    results["peak_memory_mb"] = peak_memory_mb(device)
    write_results(cfg, results)
    if cfg.export:
        with out_of_memory_is_an_error("export", best):
            plain = TARGETS[data.arch](data.num_classes)  # the target without dropout
        count = export_networks(model, plain, *cfg.export)
        print(f"exported {count} {data.arch} state_dicts to {cfg.export[1]}; input: (pixels in "
              f"[0, 1] - {data.mean.flatten().tolist()}) / {data.std.flatten().tolist()}")
    return results

if __name__ == "__main__":
    main()
