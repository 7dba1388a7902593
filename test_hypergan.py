"""Tests of hypergan.py, offline (synthetic data), on a CPU: python -m pytest -q test_hypergan.py"""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hypergan as H

HERE = os.path.dirname(os.path.abspath(__file__))
# A short synthetic run: 2 epochs of 24 steps of 8 x 8 images, a small hypernetwork, 10 evaluated
FAST = ["--dataset", "synthetic-mnist", "--synthetic-size", "2048", "--epochs", "2",
        "--networks-per-step", "8", "--images-per-network", "8", "--eval-networks", "10",
        "--hidden", "64", "--no-figures"]
TINY = FAST + ["--synthetic-size", "1024", "--epochs", "1"]  # behaviour that needs no learning

def cli(*args, check=True):
    """Runs hypergan.py as a user would: a subprocess."""
    command = [sys.executable, os.path.join(HERE, "hypergan.py"), *args]
    r = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r

def one_line_error(r):
    """A failure as the user sees it: exit code 2, one `error:` line, no traceback."""
    lines = (r.stderr if isinstance(r.stderr, str) else r.stderr.read()).strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    return lines[0]

def run(capsys, *args):
    """hypergan.main in this process (no interpreter start-up); returns (results, stdout)."""
    results = H.main([str(a) for a in args])
    return results, capsys.readouterr().out

def fails(capsys, *args):
    """The one `error:` line of a run that must fail with exit code 2."""
    with pytest.raises(SystemExit) as e:
        H.main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    return err[0]

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished run, shared by the tests that need a checkpoint: (out-dir, its results)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    return out, H.main(FAST + ["--out-dir", str(out)])

def make(arch, K=4, seed=0, **kw):
    torch.manual_seed(seed)
    net = H.TARGETS[arch](10)
    model = H.HyperGAN(net, hidden=32, **kw)
    shape = (1, 28, 28) if arch == "small" else (3, 32, 32)
    return net, model, model.sample(K), shape

def looped(net, theta, x, shared):
    """The plain reading of functional_forward: network k is `net` holding theta[k]."""
    names = [name for name, _ in net.named_parameters()]
    outputs = []
    for k in range(len(theta[0][0])):
        params = dict(zip(names, [t[k] for pair in theta for t in pair]))
        outputs.append(torch.func.functional_call(net, params, (x if shared else x[k],)))
    return torch.stack(outputs)

def theta_around(net, K):
    """K networks about net's own weights: [(weight (K, ...), bias (K, out)) for each layer]."""
    return [(layer.weight + 0.1 * torch.randn(K, *layer.weight.shape),
             layer.bias + 0.1 * torch.randn(K, *layer.bias.shape))
            for layer in H.param_layers(net)]

NETS = {  # name: (target, input shape); the third is the padded, strided, pooled network
    "small": (H.small_net, (1, 28, 28)), "mednet": (H.mednet, (3, 32, 32)),
    "padded, strided, pooled": (lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)), (3, 32, 32)),
    "dilated, same padding, flattened": (lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=2, dilation=2), nn.AvgPool2d(2), nn.GELU(), nn.Dropout(0.0),
        nn.Conv2d(8, 6, 4, padding="same"), nn.MaxPool2d(3, stride=2, padding=1), nn.Tanh(),
        nn.Flatten(), nn.Linear(384, 10)), (3, 32, 32)),
    "flatten first": (lambda: nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.SiLU(), nn.Linear(16, 10)), (3, 32, 32)),
}

# ----- the method's pieces ------------------------------------------------------------------
@pytest.mark.parametrize("name", list(NETS))
def test_both_paths_of_functional_forward_equal_a_loop_of_plain_modules(name):
    torch.manual_seed(0)
    target, shape = NETS[name]
    net = target()
    H.check_target(net)
    theta = theta_around(net, K=3)
    x = torch.randn(3, 5, *shape)
    for shared in (False, True):  # each network its images; one batch for all
        inputs = x[0] if shared else x
        batched = H.functional_forward(net, theta, inputs, shared=shared)  # (K, B, classes)
        torch.testing.assert_close(batched, looped(net, theta, inputs, shared),
                                   rtol=1e-4, atol=1e-5)

@pytest.mark.parametrize("layers, words", [
    ([nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)], "BatchNorm2d"),
    ([nn.Flatten(), nn.Linear(3072, 10), nn.Softmax(-1)], "Softmax"),
    ([nn.Conv2d(3, 6, 3, groups=3)], "groups"), ([nn.Conv2d(3, 8, 3, bias=False)], "no bias"),
    ([nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")], "zeros"),
    ([nn.Conv2d(3, 8, 3), nn.Linear(30, 10)], "Flatten"),
    ([nn.Flatten(), nn.MaxPool2d(2)], "after the Flatten")])
def test_other_layers_are_refused_in_one_line_before_training(tmp_path, capsys, monkeypatch,
                                                              layers, words):
    with pytest.raises(H.UserError, match=words):
        H.check_target(nn.Sequential(*layers))
    monkeypatch.setitem(H.TARGETS, "small", lambda classes, p: nn.Sequential(*layers))
    assert words in fails(capsys, *TINY, "--out-dir", tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()

class ConstantD(nn.Module):
    """A 'discriminator' whose logit is the first coordinate of its input: Eq. (3) by hand."""
    def forward(self, x):
        return x[..., :1]

def test_eq3_value_and_signs_by_hand():
    D = ConstantD()
    p = torch.tensor([[[0.0], [math.log(3)]]])  # K = 1, N = 2: D(p) = 1/2, 3/4
    z = torch.tensor([[[0.0], [-math.log(3)]]])  # D(z) = 1/2, 1/4
    expected = -(2 * math.log(0.5) + 2 * math.log(0.75))
    assert H.discriminator_loss(D, z, p).item() == pytest.approx(expected)
    # Q's share of Dist, -sum_i log(1 - D(z_i)) = -(log 1/2 + log 3/4); Eq. (2) subtracts it
    assert H.code_distance(D, z).item() == pytest.approx(-(math.log(0.5) + math.log(0.75)))
    assert H.discriminator_loss(D, z - 1, p + 1) < H.discriminator_loss(D, z, p)  # D's aim
    assert H.code_distance(D, z + 1) > H.code_distance(D, z)  # codes like the prior: Q's aim

def test_d_learns_the_labels_of_eq3():
    # D minimises Eq. (3): on codes away from the prior, D(p) -> 1 and D(z) -> 0
    torch.manual_seed(0)
    D = H.discriminator(32)
    opt = torch.optim.Adam(D.parameters(), lr=1e-2)
    z = torch.randn(64, 3, H.Z_DIM) + 0.5
    for _ in range(30):
        H.descend(opt, H.discriminator_loss(D, z, torch.randn_like(z)))
    with torch.no_grad():
        D_p, D_z = torch.sigmoid(D(torch.randn_like(z))).mean(), torch.sigmoid(D(z)).mean()
    assert D_p > 0.9 and D_z < 0.1, (D_p, D_z)

@pytest.mark.parametrize("beta", [0.0, 2.5])
def test_the_qg_loss_is_eq2_and_beta_0_leaves_the_cross_entropy(monkeypatch, beta):
    net, model, _, shape = make("small", K=8)
    D = H.discriminator(32)
    opt = H.make_optimizers(model, D, H.parse_args(["--out-dir", "unused"]), 10)
    losses, real_descend = {}, H.descend

    def recording_descend(optimizer, loss):
        losses[optimizer] = loss.item()
        real_descend(optimizer, loss)
    monkeypatch.setattr(H, "descend", recording_descend)
    priors, real_loss = [], H.discriminator_loss

    def recording_loss(D, z, p):  # p_i ~ P = N(0, I) for each code
        priors.append(p)
        return real_loss(D, z, p)
    monkeypatch.setattr(H, "discriminator_loss", recording_loss)
    x, y = torch.randn(8, 4, *shape), torch.randint(10, (8, 4))
    ce, d_loss, q_adv, _, _, _ = H.hypergan_step(model, D, net, opt, x, y, beta).tolist()
    p = priors[0]
    assert p.shape == (8, 3, H.Z_DIM) and abs(p.mean()) < 0.05 and abs(p.std() - 1) < 0.05
    assert q_adv < 0 and losses[opt.d] == pytest.approx(d_loss)
    assert losses[opt.g] == pytest.approx(ce + beta * q_adv)  # ce - beta * Dist_z

def test_a_qg_step_with_d_held_fixed_raises_d_of_the_codes():
    # Eq. (2) subtracts beta * Dist: Q moves the codes to where D sees the prior
    net, model, _, shape = make("small", K=16)
    D = H.discriminator(32)
    opt = H.make_optimizers(model, D, H.parse_args(["--out-dir", "unused"]), 10)
    separate = torch.optim.Adam(D.parameters(), lr=1e-2)
    for _ in range(50):  # D first learns to tell them apart
        z = model.codes(model.sample_s(64)).detach()
        H.descend(separate, H.discriminator_loss(D, z, torch.randn_like(z)))
    for group in opt.d.param_groups:
        group["lr"] = 0.0  # then D is held fixed

    s = torch.randn(256, H.S_DIM)  # the same 256 codes each time
    def D_of_codes():
        with torch.no_grad():
            return torch.sigmoid(D(model.codes(s))).mean().item()
    before = D_of_codes()
    x, y = torch.randn(16, 4, *shape), torch.randint(10, (16, 4))
    for _ in range(5):
        H.hypergan_step(model, D, net, opt, x, y, beta=10.0)
    assert D_of_codes() > 3 * before, (before, D_of_codes())

def test_eq1_pairs_each_network_with_its_own_labels():
    out, y = torch.randn(3, 4, 5), torch.randint(5, (3, 4))
    ce, accuracy = H.classification_loss(out, y)
    by_hand = sum(F.cross_entropy(out[k], y[k]) for k in range(3)) / 3
    assert ce.item() == pytest.approx(by_hand.item())
    assert accuracy.item() == pytest.approx((out.argmax(-1) == y).float().mean().item())

def test_each_generator_reads_its_own_code_and_two_noises_give_two_networks():
    net, model, theta, _ = make("small")  # theta: 4 networks, training mode
    for (w, _), G_i in zip(theta, model.G):  # apart by about init spread x scale
        assert (w[0] - w[1]).abs().mean() > 0.2 * 0.1 * G_i[-1].scale
    model.eval()
    z = model.codes(model.sample_s(4))
    for i in range(3):  # move code i: only layer i changes
        moved = z.clone()
        moved[:, i] += 1.0
        pairs = zip(model.generate(z), model.generate(moved))
        assert [not torch.equal(a[0], b[0]) for a, b in pairs] == [j == i for j in range(3)]

def test_mixer_pretraining_matches_the_codes_mean_and_measures_their_covariance():
    # row 16: in 100 steps the codes' mean goes to 0, their covariance only starts toward I;
    # the loss returned holds both terms of the moment matching
    torch.manual_seed(0)
    model = H.HyperGAN(H.small_net(10), hidden=64)

    def moments():  # over 2,000 noise vectors
        with torch.no_grad():
            z = model.codes(model.sample_s(2000)).transpose(0, 1)  # (N, 2000, d)
        cov = torch.stack([torch.cov(z_i.T) for z_i in z])
        return z.mean(1).pow(2).mean().item(), (cov - torch.eye(H.Z_DIM)).pow(2).mean().item()
    mean_before, cov_before = moments()
    loss = H.pretrain_mixer(model)
    mean_after, cov_after = moments()
    assert mean_after < 0.01 * mean_before and cov_after < cov_before
    assert loss == pytest.approx(mean_after + cov_after, rel=0.1)

def test_an_ensemble_predicts_the_mean_of_its_members_softmax():
    torch.manual_seed(0)
    net = H.small_net(10)
    theta, x = theta_around(net, 3), torch.randn(5, 1, 28, 28)
    members = looped(net, theta, x, shared=True).softmax(-1)  # (3, 5, 10)
    torch.testing.assert_close(H.predict(net, theta, x), members)
    torch.testing.assert_close(H.ensemble_probs(net, theta, x), members.mean(0))
    assert H.evaluate(members, members.mean(0).argmax(-1))["ensemble"]["1"]["mean"] < 1
    assert H.evaluate(members, members.mean(0).argmax(-1), (3,))["ensemble"]["3"]["mean"] == 1

@pytest.mark.parametrize("method", ["hypergan", "ensemble"])
def test_an_epoch_shows_each_image_once_to_each_order(method):
    cfg = H.parse_args(["--method", method, "--networks-per-step", "4",
                        "--images-per-network", "3", "--out-dir", "unused"])
    batches = H.epoch_batches(cfg, 50, torch.Generator().manual_seed(0))  # (steps, K, b)
    if method == "hypergan":  # one order: 4 steps of 4 x 3 distinct images
        assert batches.shape == (4, 4, 3) and len(batches.unique()) == 48
    else:  # each member its own order of 16 steps x 3
        members = batches.transpose(0, 1).flatten(1)  # (K, 48)
        assert batches.shape == (16, 4, 3) and all(len(m.unique()) == 48 for m in members)
        assert not torch.equal(members[0], members[1])

def test_fig7_diversity_by_hand():
    net = H.small_net(10)
    norms = torch.tensor([1.0, 2.0, 3.0])  # layer 0: std / mean = 1 / 2
    theta = [(layer.weight.detach().expand(3, *layer.weight.shape), torch.zeros(3, len(layer.bias)))
             for layer in H.param_layers(net)]  # 3 copies of one random network
    theta[0] = (theta[0][0] / theta[0][0][0].norm() * norms.view(3, 1, 1, 1, 1), theta[0][1])
    fixed = H.StandardEnsemble(net, 3)
    fixed.params = nn.ParameterList(nn.Parameter(t) for pair in theta for t in pair)
    div = H.diversity(fixed, net, torch.randn(4, 1, 28, 28), n_networks=3, n_predicting=3)
    assert div["weight_norm_rsd"] == pytest.approx([0.5, 0, 0], abs=1e-6)
    assert div["disagreement"] == 0  # one function: the weights differ in scale

def test_the_d_step_moves_only_d_and_the_qg_step_only_q_and_g(monkeypatch):
    net, model, _, shape = make("small", K=8)
    D = H.discriminator(32)
    opt = H.make_optimizers(model, D, H.parse_args(["--out-dir", "unused"]), 10)
    modules = dict(D=D, Q=model.Q, G=model.G)
    moved, graded, real_descend = [], [], H.descend

    def snapshot():  # weights and gradients (none: an empty tensor)
        return {name: [(p.clone(), torch.zeros(0) if p.grad is None else p.grad.clone())
                       for p in m.parameters()] for name, m in modules.items()}

    def changed(before, after, i):  # i = 0: the weights; i = 1: their gradients
        return {name for name in modules if any(not torch.equal(a[i], b[i])
                                                for a, b in zip(before[name], after[name]))}

    def recording_descend(optimizer, loss):  # which modules each update changes, and where
        before = snapshot()  # its backward pass put gradients
        real_descend(optimizer, loss)
        after = snapshot()
        moved.append(changed(before, after, 0))
        graded.append(changed(before, after, 1))
    monkeypatch.setattr(H, "descend", recording_descend)
    x, y = torch.randn(8, 4, *shape), torch.randint(10, (8, 4))
    H.hypergan_step(model, D, net, opt, x, y, beta=1.0)
    H.hypergan_step(model, D, net, opt, x, y, beta=1.0)
    assert moved == [{"D"}, {"Q", "G"}] * 2 and graded == moved, (moved, graded)

@pytest.mark.parametrize("spread", [0.1, 1.0])
def test_initial_spread_is_init_spread_times_the_init_scale(spread):
    # The output layer's promise (deviation row 3): the mean network starts at the target's own
    # init, and each sampled network departs from it by about init_spread x 1/sqrt(fan_in)
    # (x 0.45, the std of W h for a unit-variance h)
    net, model, theta, _ = make("small", K=512, init_spread=spread)  # training mode, as a step
    for (w, _), layer, G in zip(theta, H.param_layers(net), model.G):
        ratio = (w.std(0).mean() / G[-1].scale / spread).item()
        assert 0.35 < ratio < 0.55, ratio
        torch.testing.assert_close(G[-1].bias[:w[0].numel()].view_as(w[0]), layer.weight)
        assert (w.mean(0) - layer.weight).abs().mean() < 0.2 * spread * G[-1].scale

def test_lr_spread_is_the_rate_of_each_generators_last_weight():
    cfg = H.parse_args(["--dataset", "synthetic-cifar10", "--lr-spread", "0.25"])
    net, model, D = H.build(cfg, "mednet", 10, torch.device("cpu"))
    rest, spread = H.make_optimizers(model, D, cfg, total_steps=10).g.param_groups
    assert spread["lr"] == pytest.approx(0.25 * cfg.lr) and rest["lr"] == cfg.lr
    assert {id(w) for w in spread["params"]} == {id(G_i[-1].weight) for G_i in model.G}
    assert len(rest["params"]) + len(spread["params"]) == len(list(model.parameters()))

def test_repulsion_by_hand_and_it_pushes_the_networks_apart():
    # K = 2: h = |f_1 - f_2|^2 / log 2, so the kernel is exp(-log 2) = 1/2 for any two networks
    assert H.repulsion(torch.tensor([[0.0, 1.0], [3.0, -1.0]])).item() == pytest.approx(0.5)
    f = torch.randn(5, 3, 10)
    d2 = torch.stack([((f[i] - f[j]) ** 2).sum() for i in range(5) for j in range(5) if i != j])
    by_hand = torch.exp(-d2 / (d2.median() / math.log(5))).mean().item()
    assert H.repulsion(f).item() == pytest.approx(by_hand, rel=1e-4)
    x, y, spread = torch.randn(8, 4, 1, 28, 28), torch.randint(10, (8, 4)), {}
    for weight in (0.0, 10.0):  # the same start, 10 steps with and without it
        net, model, _, _ = make("small", K=8)
        D = H.discriminator(32)
        opt = H.make_optimizers(model, D, H.parse_args(["--out-dir", "unused"]), 10)
        for _ in range(10):
            H.hypergan_step(model, D, net, opt, x, y, 1.0, repulsion_weight=weight)
        with torch.no_grad():
            outputs = H.functional_forward(net, model.eval().sample(8), x[0], shared=True)
        spread[weight] = outputs.std(0).mean().item()
    assert spread[10.0] > 1.5 * spread[0.0], spread

def test_loss_falls_and_accuracy_rises_on_synthetic_task(trained):
    history, accuracy = trained[1]["history"], trained[1]["accuracy"]  # 2 epochs
    assert history[-1]["train"]["ce"] < 0.7 * history[0]["train"]["ce"], history
    assert history[0]["val_single_mean"] > 0.5 and accuracy["single_mean"] > 0.8, accuracy

def test_evaluation_in_chunks_equals_one_forward_and_repeats_its_networks(monkeypatch):
    net, model, _, shape = make("small")
    x, y = torch.randn(60, *shape), torch.randint(10, (60,))  # chunks: 10 networks x 50 images
    probs = H.sample_probs(model, net, x, 12)
    assert model.training  # evaluation hands training mode back
    alone = H.sample_probs(model, net, x, 1)  # row 9: a network does not depend on the
    torch.testing.assert_close(alone[0], probs[0], rtol=1e-4, atol=1e-6)  # others sampled with it
    with H.sampling(model):
        theta = model.sample(12)
    expected = H.functional_forward(net, theta, x, shared=True).softmax(-1)
    torch.testing.assert_close(probs, expected, rtol=1e-4, atol=1e-6)
    state = torch.manual_seed(5).get_state()
    torch.testing.assert_close(H.sample_probs(model, net, x, 12), probs)  # the same networks
    assert torch.equal(torch.get_rng_state(), state)  # and training's random stream untouched
    chunks, forward = [], H.functional_forward  # networks x images of each forward pass
    monkeypatch.setattr(H, "functional_forward", lambda net, theta, x, shared=False: chunks.append(
        len(theta[0][0]) * len(x)) or forward(net, theta, x, shared))
    monkeypatch.setattr(H, "MEMORY_BUDGET", 2_000_000)  # weights of 3 networks, 2 images of 3
    small = H.sample_probs(model, net, x, 12)
    assert len(chunks) == 4 * 30 and max(chunks) * 8 * 31242 <= 2_000_000  # small_net's outputs
    a, b = (H.evaluate(p, y, sizes=(1, 5, 10)) for p in (small, probs))  # two budgets:
    assert a["ensemble"] == b["ensemble"]
    assert a["single_mean"] == b["single_mean"]  # Table 2
    assert a["nll"] == pytest.approx(b["nll"]) and a["ece"] == pytest.approx(b["ece"])

def test_disagreement_entropy_auroc_fpr95_by_hand():
    votes = torch.tensor([[0, 1, 0], [0, 0, 1], [0, 1, 1], [1, 1, 0]])  # 4 networks, 3 images
    # image 0: votes (3, 1) -> 3 of 6 pairs differ; image 1: (1, 3) -> 3; image 2: (2, 2) -> 4
    assert H.disagreement(F.one_hot(votes, 2).float()) == pytest.approx((3 + 3 + 4) / 18)
    assert H.entropy(torch.full((7,), 1 / 7)).item() == pytest.approx(math.log(7))
    two = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    assert H.entropy(two).tolist() == pytest.approx([math.log(2), 0])
    assert H.auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4])) == 1
    assert H.auroc(torch.tensor([0.3, 0.4]), torch.tensor([0.1, 0.2])) == 0
    assert H.auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])) == 0.5
    # pairs with pos above neg: 2 > 1 (1), 2 = 2 (1/2), 4 above all three (3): 4.5 of 6
    assert H.auroc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0])) == pytest.approx(0.75)
    pos = torch.arange(1.0, 21.0)  # 20 positives: 95 % are flagged at threshold 2
    assert H.fpr_at_95_tpr(torch.tensor([0.5, 1.0, 2.0, 3.0]), pos) == 0.5
    assert H.fpr_at_95_tpr(torch.full((4,), 2.0), pos) == 1
    assert H.fpr_at_95_tpr(torch.tensor([0.0, 1.0]), pos) == 0

def test_evaluate_by_hand():
    y = torch.tensor([0, 1])
    probs = torch.tensor([[[0.9, 0.1], [0.6, 0.4]],  # network 0: right, wrong
                          [[0.2, 0.8], [0.3, 0.7]]])  # network 1: wrong, right
    r = H.evaluate(probs, y, sizes=(1, 2, 3))
    assert r["single_mean"] == 0.5 and r["single_std"] == 0 and r["disagreement"] == 1
    assert r["ensemble"]["2"] == dict(mean=1.0, std=0.0, draws=1)  # the mean: 0.55, 0.55 right
    assert r["nll"]["2"] == pytest.approx(-math.log(0.55))
    assert r["nll"]["1"] == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.2)
                                            + math.log(0.7)) / 4)
    assert r["ensemble"]["3"] is None
    assert r["nll"]["3"] is None
    assert r["ece"]["3"] is None
    # ECE of one network, each image in a bin of its own: network 0 (0.1 + 0.6) / 2, network 1
    # (0.8 + 0.3) / 2, mean 0.45; the pair's mean softmax: 0.55 right twice, one bin, 0.45
    assert r["ece"]["1"] == pytest.approx(0.45) and r["ece"]["2"] == pytest.approx(0.45)
    both_90 = torch.tensor([[[0.9, 0.1], [0.9, 0.1]]])  # one bin: |0.9 - 1/2|
    assert H.calibration_error(both_90, y).tolist() == pytest.approx([0.4])

def test_a_run_at_chance_says_it_is_not_learning(tmp_path, capsys):
    res, out = run(capsys, *FAST, "--lr", 1e-12, "--out-dir", tmp_path)  # nothing moves
    assert "warning: validation accuracy" in out and "--lr-d" in res["warning"]
    assert res["history"][0]["warning"] is None  # from epoch 2 only

def test_augment_moves_each_image_on_black_and_mirrors_half_with_flip():
    image, black = torch.rand(3, 32, 32), torch.tensor([-1.0, -2.0, -3.0]).view(3, 1, 1)
    padded = F.pad(image - black, (4,) * 4) + black  # black, 4 pixels around
    moved = [padded[:, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
    candidates = moved + [m.flip(-1) for m in moved]  # 81 moves, then the same mirrored
    for flip in (False, True):
        g = torch.Generator().manual_seed(0)
        out = H.augment_batch(image.expand(512, 3, 32, 32), black, 4, flip, g)
        which = torch.tensor([next(k for k, c in enumerate(candidates) if torch.equal(img, c))
                              for img in out])  # StopIteration: not a moved image
        assert len(set((which % 81).tolist())) > 70  # the moves: all 81 equally likely
        assert 0.4 < (which >= 81).float().mean() < 0.6 if flip else (which < 81).all()

def test_attacks_stay_in_the_ball_and_raise_the_loss(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(H, "ADV_IMAGES", 32)
    cfg = H.parse_args(FAST + ["--method", "ensemble", "--out-dir", "unused"])
    data = H.load_data(cfg, torch.device("cpu"))
    net, model, _ = H.build(cfg, "small", 10, torch.device("cpu"))
    theta = [(w.detach(), b.detach()) for w, b in model.sample(4)]
    x, y = data.test.x[:64], data.test.y[:64]

    def nll(inputs):
        return F.nll_loss(H.ensemble_log_probs(net, theta, inputs), y).item()

    pixels = x * data.std + data.mean
    for steps in (1, 5):  # FGSM, PGD
        g = torch.Generator().manual_seed(0)
        adv = H.attack(net, theta, x, y, 0.05, steps, data, g)
        adv_pixels = adv * data.std + data.mean
        assert nll(adv) > nll(x) and (adv_pixels - pixels).abs().max() <= 0.05 + 1e-5
        assert adv_pixels.min() >= -1e-6 and adv_pixels.max() <= 1 + 1e-6
    res = H.adversarial_evaluation(net, theta, data, model)
    assert all(res["pgd"][str(e)]["accuracy"] <= res["clean_accuracy"] for e in H.EPSILONS)
    assert res["pgd"]["0.3"]["accuracy"] < res["fgsm"]["0.01"]["accuracy"]

def test_baselines_sample_their_members_and_masks():
    template = H.small_net(10)
    before = template[0].weight.clone()
    ensemble = H.StandardEnsemble(template, 3)
    w = ensemble.sample(3)[0][0]
    assert all((w[i] - w[j]).abs().mean() > 0.5 * w.abs().mean() for i, j in ((0, 1), (1, 2)))
    assert torch.equal(template[0].weight, before)  # independently initialised copies
    assert torch.equal(ensemble.sample(10)[0][0], w)  # at most its members, in order
    net = H.small_net(10, dropout=0.5)
    dropout, x = H.MCDropout(net), torch.randn(6, 1, 28, 28)
    a = H.sample_probs(dropout, net, x, 4)
    assert (a[0] - a[1]).abs().max() > 1e-3  # two masks, two predictions
    torch.testing.assert_close(H.sample_probs(dropout, net, x, 4), a)  # the seed repeats them
    model = H.HyperGAN(H.small_net(10), hidden=32, mixer=False)
    assert isinstance(model.Q, nn.Identity) and model.s_dim == 3 * H.Z_DIM
    s = model.sample_s(5)
    torch.testing.assert_close(model.codes(s), s.view(5, 3, H.Z_DIM))  # z_i: slice i of s

# ----- the command line, end to end -------------------------------------------------------------
def test_interrupted_run_is_refused_a_fresh_start_and_resumes_exactly(tmp_path, monkeypatch,
                                                                        capsys, trained):
    out, real_step, calls = tmp_path / "run", H.hypergan_step, []

    def step_then_interrupt(*a, **k):  # Ctrl-C in the middle of epoch 2
        calls.append(1)
        if len(calls) == 30:
            raise KeyboardInterrupt
        return real_step(*a, **k)
    monkeypatch.setattr(H, "hypergan_step", step_then_interrupt)
    assert "--resume" in fails(capsys, *FAST, "--out-dir", out)
    monkeypatch.undo()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    before = (out / "checkpoint.pt").read_bytes()
    msg = fails(capsys, *FAST, "--out-dir", out)  # a fresh run into it is refused
    assert "--resume" in msg and "new --out-dir" in msg
    msg = fails(capsys, *FAST, "--out-dir", out, "--resume", "--shift", "0")
    assert "--shift 2" in msg and "this run has 0" in msg
    assert (out / "checkpoint.pt").read_bytes() == before
    res, stdout = run(capsys, *FAST, "--out-dir", out, "--resume")  # as the uninterrupted run
    assert "resumed" in stdout and "D(z)" in stdout and "ETA" in stdout and "paper" in stdout
    reference = torch.load(trained[0] / "checkpoint.pt", weights_only=True)["model"]
    for k, v in torch.load(out / "checkpoint.pt", weights_only=True)["model"].items():
        torch.testing.assert_close(v, reference[k], msg=k)
    assert res["accuracy"] == trained[1]["accuracy"]
    assert res["nll"] == trained[1]["nll"]
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(res))
    assert res["accuracy"]["ensemble"]["100"] is None
    assert res["ensemble_gain"] is None
    assert res["accuracy"]["ensemble"]["5"]["draws"] == 2
    assert len(res["history"]) == 2
    steps = 2 * (2048 - 512) // 64  # 2 epochs of 24 steps
    assert res["steps_per_second"] == pytest.approx(steps / res["train_seconds"])

def test_eval_only_with_ood_attacks_figures_and_export(tmp_path, monkeypatch, capsys, trained):
    out, res = trained
    monkeypatch.setattr(H, "ADV_IMAGES", 50)
    ckpt, nets, ev = out / "best.pt", tmp_path / "nets", tmp_path / "eval"
    results_json = (out / "results.json").read_bytes()
    assert "--out-dir" in fails(capsys, *FAST, "--eval-only", "--checkpoint", ckpt, "--out-dir",
                                out)
    nm = tmp_path / "data" / "notMNIST_small"  # a tiny notMNIST folder
    from PIL import Image
    for path in [nm / letter / f"{i}.png" for letter in "AB" for i in range(3)]:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((torch.rand(28, 28) * 255).byte().numpy()).save(path)
    (nm / "A" / "broken.png").write_bytes(b"not a png")  # skipped, as in the real archive
    with_figures = [a for a in FAST if a != "--no-figures"]
    again, _ = run(capsys, *with_figures, "--eval-only", "--checkpoint", ckpt, "--out-dir", ev,
                   "--export", 3, nets, "--data-root", tmp_path / "data",
                   "--ood", "noise,notmnist", "--adversarial")
    assert (out / "results.json").read_bytes() == results_json  # the training run's, untouched
    assert again["accuracy"] == res["accuracy"]
    assert again["config"]["checkpoint"] == str(ckpt)
    assert len(H.read_notmnist(tmp_path / "data")) == 6
    assert again["ood"]["noise"]["auroc"] > 0.9
    adversarial = again["adversarial"]
    assert adversarial["pgd"]["0.3"]["accuracy"] < adversarial["clean_accuracy"]
    assert adversarial["pgd_fresh"]["0.3"]["accuracy"] < adversarial["clean_accuracy"]
    for png in ("entropy_cdf.png", "diversity.png"):
        assert (ev / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (ev / png).stat().st_size > 10_000, png
    # an exported network runs alone in small_net(), inputs normalised (synthetic: 1/2, 1/6)
    assert sorted(os.listdir(nets)) == ["net_000.pt", "net_001.pt", "net_002.pt"]
    module = H.small_net()
    module.load_state_dict(torch.load(nets / "net_000.pt", weights_only=True))
    x, y = H.synthetic_split((1, 28, 28), 1024, 2)
    assert (module((x - 0.5) * 6).argmax(-1) == y).float().mean() > 0.8
    msg = fails(capsys, *FAST, "--eval-only", "--checkpoint", ckpt, "--out-dir", tmp_path / "ev2",
                "--export", 2, nets)
    assert "already holds exported networks" in msg

@pytest.mark.parametrize("variant", [["--method", "dropout"],
                                     ["--method", "ensemble", "--networks-per-step", "4"],
                                     ["--no-mixer"], ["--beta", "0"],
                                     ["--dataset", "synthetic-cifar10"]])
def test_baselines_ablations_and_cifar_train_evaluate_and_export(tmp_path, capsys, variant):
    res, _ = run(capsys, *FAST, "--epochs", "1", *variant, "--out-dir", tmp_path / "run",
                 "--export", 2, tmp_path / "n")
    cifar = "synthetic-cifar10" in variant
    assert res["accuracy"]["single_mean"] > (0.11 if cifar else 0.5), res["accuracy"]
    assert 0 < res["history"][0]["diversity"]["disagreement"] < 0.9  # they differ, not wildly
    module = H.mednet() if cifar else H.small_net()  # the constructor the README names
    module.load_state_dict(torch.load(tmp_path / "n" / "net_001.pt", weights_only=True))
    if cifar:  # the 2019 net (row 18): 90,208 weights + biases
        assert sum(p.numel() for p in module.parameters()) == 90506

def test_toy_fits_the_points_and_spreads_outside_them(tmp_path, capsys):
    res, _ = run(capsys, "--dataset", "toy", "--epochs", "800", "--out-dir", tmp_path)
    toy = res["toy"]
    assert toy["spread_outside"] > 2 * toy["spread_inside"], toy
    # targets of std 40; the networks' mean leaves the noise: within twice its variance, 9
    assert toy["train_mse"] < 2 * 9, toy["train_mse"]
    assert (tmp_path / "toy.png").stat().st_size > 10_000

# ----- bad input and interrupts: one `error:` line, exit code 2, nothing lost, before long work ---
def test_the_process_fails_with_one_line_and_no_traceback(tmp_path):
    assert "--frobnicate" in one_line_error(cli("--frobnicate", check=False))
    r = cli("--dataset", "mnist", "--data-root", str(tmp_path), "--no-download", "--out-dir",
            str(tmp_path / "m"), check=False)
    msg = one_line_error(r)
    assert "could not load mnist" in msg and str(tmp_path) in msg
    command = [sys.executable, os.path.join(HERE, "hypergan.py"), *TINY, "--out-dir", str(tmp_path)]
    p = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.readline()
    p.stdout.close()  # the reader stops, as `| head -1` would
    p.wait(timeout=300)
    assert "error: the output closed" in one_line_error(p)
    twins = [subprocess.Popen(command[:-1] + [str(tmp_path / "twins")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]  # at once
    codes = [twin.wait(timeout=300) for twin in twins]
    assert sorted(codes) == [0, 2]  # one run a folder, one refused
    msg = one_line_error(twins[codes.index(2)])
    assert "another run" in msg or "already holds" in msg  # which: the processes' timing

BAD_OPTIONS = [  # (options, words of the error)
    (["--dataset", "imagenet"], "invalid choice"), (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"), (["--lr-d", "inf"], "--lr-d"), (["--beta", "-1"], "--beta"),
    (["--epochs", "0"], "--epochs"), (["--networks-per-step", "1"], "--networks-per-step"),
    (["--shift", "-2"], "--shift"), (["--init-spread", "nan"], "--init-spread"),
    (["--lr-spread", "-0.1"], "--lr-spread"), (["--lr-spread", "nan"], "--lr-spread"),
    (["--seed", "-3"], "--seed"), (["--seed", str(2**32)], "--seed"),
    (["--hidden", "x"], "--hidden"), (["--export", "\u00b2", "n"], "--export"),
    (["--eval-networks", "0"], "--eval-networks"), (["--export", "x", "nets"], "--export"),
    (["--export", "0", "n"], "--export"), (["--ood", "imagenet"], "unknown --ood"),
    (["--ood", "mnist5-9"], "--dataset mnist0-4"),
    (["--ood", "notmnist", "--data-root", "absent"], "no readable images"),  # not faked
    (["--dataset", "synthetic-cifar10", "--ood", "notmnist"], "(1, 28, 28)"),
    (["--checkpoint", "x.pt"], "--eval-only"), (["--eval-only"], "--checkpoint"),
    (["--resume"], "no checkpoint.pt"), (["--dataset", "toy", "--ood", "noise"], "toy"),
    (["--dataset", "toy", "--export", "2", "n"], "toy"), (["--dataset", "toy", "--resume"], "toy"),
    (["--repulsion", "-1"], "--repulsion"), (["--repulsion", "nan"], "--repulsion"),
    (["--repulsion", "1", "--method", "ensemble"], "--repulsion"),
    (["--dataset", "toy", "--repulsion", "1"], "toy")]

def test_bad_options_fail_fast_and_write_nothing(tmp_path, capsys):
    for i, (args, words) in enumerate(BAD_OPTIONS):
        out = tmp_path / str(i)
        assert words in fails(capsys, *TINY, "--out-dir", out, *args), args
        assert not out.exists() or not os.listdir(out), args

def test_bad_paths_and_files_fail_fast(tmp_path, capsys, monkeypatch, trained):
    (tmp_path / "file").write_text("mine")
    assert "not a writable folder" in fails(capsys, *TINY, "--out-dir", tmp_path / "file")
    assert "not a writable folder" in fails(capsys, *TINY, "--out-dir", tmp_path / "file" / "sub")
    msg = fails(capsys, *TINY, "--out-dir", tmp_path / "o", "--export", 2, tmp_path / "file")
    assert "--export PATH" in msg and (tmp_path / "file").read_text() == "mine"
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun starts each process
    assert "torchrun" in fails(capsys, *TINY, "--out-dir", tmp_path / "w")
    monkeypatch.delenv("WORLD_SIZE")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "run.lock").touch()  # another process is writing there
    assert "another run" in fails(capsys, *TINY, "--out-dir", tmp_path / "busy")
    if not torch.cuda.is_available():
        msg = fails(capsys, *TINY, "--device", "cuda", "--out-dir", tmp_path / "d")
        assert "--device cuda" in msg
    evaluate = [*TINY, "--eval-only", "--out-dir", tmp_path / "e", "--checkpoint"]
    for content in (b"not a checkpoint", b""):
        (tmp_path / "bad.pt").write_bytes(content)
        assert "not a readable" in fails(capsys, *evaluate, tmp_path / "bad.pt")
    torch.save(dict(format=1, config={}), tmp_path / "old.pt")
    assert "format 1" in fails(capsys, *evaluate, tmp_path / "old.pt")
    for args, words in ((["--hidden", "32"], "--hidden 64"), (["--no-mixer"], "--mixer"),
                        (["--dataset", "synthetic-cifar10"], "--dataset"),
                        (["--method", "dropout"], "--method")):
        msg = fails(capsys, *FAST, *args, "--eval-only", "--checkpoint", trained[0] / "best.pt",
                    "--out-dir", tmp_path / "e")
        assert words in msg
    raw = tmp_path / "mnist" / "MNIST" / "raw"  # corrupt: truncated and empty
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"\x00\x00\x08\x03\x00" if "train" in name else b"")
    msg = fails(capsys, "--dataset", "mnist", "--data-root", tmp_path / "mnist", "--no-download",
                "--out-dir", tmp_path / "c")
    assert "could not load mnist" in msg

@pytest.mark.parametrize("phase", ["pretraining", "checkpoint", "evaluation", "non-finite",
                                   "out of memory in training", "out of memory in evaluation"])
def test_ctrl_c_a_failed_step_or_no_memory_keeps_the_last_checkpoint(tmp_path, monkeypatch,
                                                                     capsys, trained, phase):
    out, before = tmp_path / "run", None
    if phase != "pretraining":  # a copy of the finished run
        shutil.copytree(trained[0], out)
        before = (out / "checkpoint.pt").read_bytes()

    def interrupted_write(obj, path, *a, **k):  # Ctrl-C halfway through a file
        open(path, "wb").write(b"half a checkpoint")
        raise KeyboardInterrupt

    def fail(*a, **k):  # Ctrl-C, or a GPU's memory
        raise torch.OutOfMemoryError("CUDA") if "memory" in phase else KeyboardInterrupt
    if phase == "non-finite":
        real_ce = F.cross_entropy
        monkeypatch.setattr(H.F, "cross_entropy", lambda *a, **k: real_ce(*a, **k) * math.nan)
    elif phase == "checkpoint":
        monkeypatch.setattr(H.torch, "save", interrupted_write)
    else:
        where = dict(pretraining="pretrain_mixer", training="hypergan_step", evaluation="evaluate")
        monkeypatch.setattr(H, where[phase.split()[-1]], fail)
    resume = ["--resume"] if phase.endswith("evaluation") else ["--resume", "--epochs", "3"]
    msg = fails(capsys, *FAST, "--out-dir", out, *(resume if before else []))
    assert ("interrupted" if phase in ("pretraining", "checkpoint", "evaluation") else phase) in msg
    if before:
        assert (out / "checkpoint.pt").read_bytes() == before
        assert H.load_checkpoint(str(out / "checkpoint.pt"))["epoch"] == 2  # still loadable
    if phase.startswith("out of memory"):
        assert f"{out / 'best.pt'}' again with --eval-only --checkpoint" in msg
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]

@pytest.mark.parametrize("target", ["checkpoint.pt", "results.json", "diversity.png", "net_000.pt"])
def test_a_full_disk_is_one_line_and_keeps_what_was_written(tmp_path, monkeypatch, capsys,
                                                            target):
    out, nets = tmp_path / "run", tmp_path / "nets"
    real_save, real_replace = torch.save, os.replace
    checkpoints = []

    def full_disk(tmp, path):  # the write of `target` runs out of space
        if os.path.basename(path) == target and (target != "checkpoint.pt" or checkpoints):
            raise OSError(28, "No space left on device")
        checkpoints.extend([path] if path.endswith("checkpoint.pt") else [])
        real_replace(tmp, path)

    def torch_full_disk(obj, path, *a, **k):  # as torch.save reports it: a RuntimeError
        if target == "checkpoint.pt" and checkpoints and "checkpoint" in str(path):
            open(path, "wb").write(b"half")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")
        real_save(obj, path, *a, **k)
    monkeypatch.setattr(H.os, "replace", full_disk)
    monkeypatch.setattr(H.torch, "save", torch_full_disk)
    with_figures = [a for a in FAST if a != "--no-figures"]
    msg = fails(capsys, *with_figures, "--out-dir", out, "--export", 2, nets)
    written = out / target if target != "net_000.pt" else nets / target
    assert str(written) in msg and "--resume" in msg
    assert not [f for f in os.listdir(out) + os.listdir(nets) if f.endswith(".tmp")]
    epochs = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    assert epochs == (1 if target == "checkpoint.pt" else 2)  # the last good one is intact
