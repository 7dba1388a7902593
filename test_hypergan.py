"""Tests for hypergan.py: offline (synthetic data only), CPU. Run: python -m pytest -q test_hypergan.py"""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hypergan as H

HERE = os.path.dirname(os.path.abspath(__file__))
# A short synthetic run: 2 epochs of 24 steps of 8 networks x 8 images, a small hypernetwork, 10 evaluated networks.
FAST = ["--dataset", "synthetic-mnist", "--synthetic-size", "2048", "--epochs", "2", "--networks-per-step", "8",
        "--images-per-network", "8", "--eval-networks", "10", "--hidden", "64", "--no-figures"]
TINY = FAST + ["--synthetic-size", "1024", "--epochs", "1"]       # for behaviour that needs little learning


def cli(*args, check=True):
    """Runs hypergan.py as a user would: a subprocess."""
    r = subprocess.run([sys.executable, os.path.join(HERE, "hypergan.py"), *args], capture_output=True, text=True,
                       timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def one_line_error(r):
    """A failure as the user sees it: exit code 2, one `error:` line, no traceback."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), (r.returncode, r.stderr)
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
    return net, model, model.sample(K), (1, 28, 28) if arch == "small" else (3, 32, 32)


# ----- the method's pieces ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["small", "mednet"])
def test_generated_shapes_and_batched_forward_equal_nn_module(arch):
    net, model, theta, shape = make(arch, K=3)
    params = list(net.parameters())
    assert [t.shape[1:] for pair in theta for t in pair] == [p.shape for p in params]
    x = torch.randn(3, 5, *shape)
    for shared in (False, True):
        batched = H.functional_forward(net, theta, x[0] if shared else x)            # (K, B, classes)
        for k in range(3):
            module = H.TARGETS[arch](10)
            module.load_state_dict({n: t[k] for (n, _), t in zip(module.named_parameters(), [t for p in theta for t in p])})
            layers = list(module)          # the paper's order, activation before pooling (row 14 says it is exact)
            for i in range(len(layers) - 1):
                if isinstance(layers[i], torch.nn.MaxPool2d) and isinstance(layers[i + 1], (nn.ReLU, nn.LeakyReLU)):
                    layers[i], layers[i + 1] = layers[i + 1], layers[i]
            expected = torch.nn.Sequential(*layers)(x[0] if shared else x[k])
            torch.testing.assert_close(batched[k], expected, rtol=1e-4, atol=1e-5)


def test_gradients_reach_mixer_and_every_generator():
    net, model, _, shape = make("small")
    z, theta = model(model.sample_s(4))
    out = H.functional_forward(net, theta, torch.randn(4, 2, *shape))
    (F.cross_entropy(out.flatten(0, 1), torch.randint(10, (8,))) - H.code_distance(H.discriminator(32), z)).backward()
    for name, module in [("Q", model.Q)] + [(f"G{i}", g) for i, g in enumerate(model.G)]:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name


class ConstantD(torch.nn.Module):
    """A 'discriminator' whose logit is the first coordinate of its input: Eq. (3) by hand."""
    def forward(self, x):
        return x[..., :1]


def test_eq3_value_and_signs_by_hand():
    D = ConstantD()
    p = torch.tensor([[[0.0], [math.log(3)]]])             # K = 1, N = 2: D(p) = 1/2, 3/4
    z = torch.tensor([[[0.0], [-math.log(3)]]])            # D(z) = 1/2, 1/4
    assert H.discriminator_loss(D, z, p).item() == pytest.approx(-(2 * math.log(0.5) + 2 * math.log(0.75)))
    # Q's share of Dist: -sum_i log(1 - D(z_i)) = -(log 1/2 + log 3/4); Eq. (2) subtracts it, so Q maximises it
    assert H.code_distance(D, z).item() == pytest.approx(-(math.log(0.5) + math.log(0.75)))
    assert H.discriminator_loss(D, z - 1, p + 1) < H.discriminator_loss(D, z, p)    # D: prior up, codes down
    assert H.code_distance(D, z + 1) > H.code_distance(D, z)    # codes that look like the prior: Dist_z larger


def test_networks_differ_by_noise_and_not_by_batch():
    net, model, _, _ = make("small")
    model.eval()
    for w, b in model.sample(2):
        assert (w[0] - w[1]).abs().mean() > 1e-3 * w.abs().mean()
    s = model.sample_s(3)                                  # eval mode: a network does not depend on the others
    torch.testing.assert_close(model.generate(model.codes(s[:1]))[0][0], model.generate(model.codes(s))[0][0][:1])


@pytest.mark.parametrize("spread", [0.1, 1.0])
def test_initial_spread_is_init_spread_times_the_init_scale(spread):
    # The output layer promises (deviation row 3): the mean network starts at the target's own init, and each sampled
    # network departs from it by about init_spread x 1/sqrt(fan_in) (x 0.45, the std of W h for a unit-variance h)
    net, model, theta, _ = make("small", K=512, init_spread=spread)                   # training mode, as a step
    for (w, _), layer, G, scale in zip(theta, H.param_layers(net), model.G, model.scales):
        ratio = (w.std(0).mean() / scale / spread).item()
        assert 0.35 < ratio < 0.55, ratio
        torch.testing.assert_close(G[-1].bias[:w[0].numel()].view_as(w[0]), layer.weight)
        assert (w.mean(0) - layer.weight).abs().mean() < 0.2 * spread * scale


def test_repulsion_by_hand_and_it_pushes_the_networks_apart():
    # K = 2: h = |f_1 - f_2|^2 / log 2, so the kernel is exp(-log 2) = 1/2 for any two different networks
    assert H.repulsion(torch.tensor([[0.0, 1.0], [3.0, -1.0]])).item() == pytest.approx(0.5)
    f = torch.randn(5, 3, 10)
    d2 = torch.stack([((f[i] - f[j]) ** 2).sum() for i in range(5) for j in range(5) if i != j])
    assert H.repulsion(f).item() == pytest.approx(torch.exp(-d2 / (d2.median() / math.log(5))).mean().item(), rel=1e-4)
    x, y, spread = torch.randn(8, 4, 1, 28, 28), torch.randint(10, (8, 4)), {}
    for weight in (0.0, 10.0):                          # the same start, 10 steps with and without the repulsion
        net, model, _, _ = make("small", K=8)
        D = H.discriminator(32)
        opts, _ = H.make_optimizers(model, D, H.parse_args(["--out-dir", "unused"]), 10)
        for _ in range(10):
            H.train_step(model, D, net, opts, x, y, 1.0, rep_weight=weight)
        with torch.no_grad():
            spread[weight] = H.functional_forward(net, model.eval().sample(8), x[0]).std(0).mean().item()
    assert spread[10.0] > 1.5 * spread[0.0], spread


def test_loss_falls_and_accuracy_rises_on_synthetic_task():
    cfg = H.parse_args(FAST + ["--out-dir", "unused"])
    data = H.load_data(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    net, model, D = H.build(cfg, "small", 10, torch.device("cpu"))
    before = H.evaluate(model, net, *data["test"], 10, sizes=())["single_mean"]
    opts, sched = H.make_optimizers(model, D, cfg, 60)
    (x, y), ce = data["train"], []
    for step in range(60):
        idx = torch.randint(len(x), (64,))
        ce.append(H.train_step(model, D, net, opts, x[idx].view(8, 8, 1, 28, 28), y[idx].view(8, 8), 1.0)[0].item())
        sched.step()
    after = H.evaluate(model, net, *data["test"], 10, sizes=())["single_mean"]
    assert sum(ce[-10:]) < 0.5 * sum(ce[:10]) and before < 0.2 and after > 0.6, (before, after)


def test_batched_evaluation_equals_per_network_evaluation():
    net, model, _, shape = make("small")
    x = torch.randn(60, *shape)                                         # in chunks of 10 networks x 50 images
    model.eval()                                                        # as sample_probs samples
    probs = H.sample_probs(model, net, x, 12, seed=3)
    theta = model.sample(12, torch.Generator().manual_seed(3))
    torch.testing.assert_close(probs, H.functional_forward(net, theta, x).softmax(-1), rtol=1e-4, atol=1e-6)


def test_disagreement_entropy_auroc_fpr95_by_hand():
    votes = torch.tensor([[0, 1, 0], [0, 0, 1], [0, 1, 1], [1, 1, 0]])               # 4 networks, 3 images
    # image 0: votes (3, 1) -> 3 of 6 pairs differ; image 1: (1, 3) -> 3; image 2: (2, 2) -> 4
    assert H.disagreement(F.one_hot(votes, 2).float()) == pytest.approx((3 + 3 + 4) / 18)
    assert H.entropy(torch.full((7,), 1 / 7)).item() == pytest.approx(math.log(7))
    assert H.entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]])).tolist() == pytest.approx([math.log(2), 0])
    assert H.auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4])) == 1
    assert H.auroc(torch.tensor([0.3, 0.4]), torch.tensor([0.1, 0.2])) == 0
    assert H.auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])) == 0.5
    # pairs with pos above neg: 2 > 1 (1), 2 = 2 (1/2), 4 above all three (3): 4.5 of 6
    assert H.auroc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0])) == pytest.approx(4.5 / 6)
    pos = torch.arange(1.0, 21.0)                          # 20 positives: 95 % are flagged at threshold 2
    assert H.fpr_at_95_tpr(torch.tensor([0.5, 1.0, 2.0, 3.0]), pos) == 0.5
    assert H.fpr_at_95_tpr(torch.full((4,), 2.0), pos) == 1 and H.fpr_at_95_tpr(torch.tensor([0.0, 1.0]), pos) == 0


def test_augment_shifts_and_flips():
    x = torch.arange(1.0, 33.0).expand(64, 3, 32, 32).clone()       # every pixel holds its column, 1..32
    out = H.augment_batch(x, torch.full((3, 1, 1), -1.0), 4, True, torch.Generator().manual_seed(0))
    flips = 0
    for img in out:
        row = img[0, 16]
        steps = (row[row > 0][1:] - row[row > 0][:-1]).unique().tolist()
        assert steps in ([1.0], [-1.0]) and 28 <= (row > 0).sum() <= 32 and set(row[row <= 0].tolist()) <= {-1.0}
        assert (img[:, 4:28] == row).all()                             # one shift for every inner row and channel
        flips += steps == [-1.0]
    assert 0 < flips < 64
    x = (torch.arange(1.0, 29.0) + 100 * torch.arange(1.0, 29.0)[:, None]).expand(256, 1, 28, 28)  # (r, c) -> 100r + c
    moves = set()
    for img in H.augment_batch(x, torch.full((1, 1, 1), -1.0), 2, False, torch.Generator().manual_seed(0))[:, 0]:
        r0, c0 = divmod(int(img[img > 0].min()) - 101, 100)           # the original pixel now at the top left
        dy, dx = int((img > 0).any(1).nonzero()[0]) - r0, int((img > 0).any(0).nonzero()[0]) - c0
        kept = x[0, 0, max(0, -dy):28 - max(0, dy), max(0, -dx):28 - max(0, dx)]
        assert torch.equal(img[max(0, dy):28 + min(0, dy), max(0, dx):28 + min(0, dx)], kept)   # moved, never mirrored
        moves.add((dy, dx))
    assert len(moves) == 25


def test_attacks_stay_in_the_ball_and_raise_the_loss(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(H, "ADV_IMAGES", 32)
    cfg = H.parse_args(FAST + ["--method", "ensemble", "--out-dir", "unused"])
    data = H.load_data(cfg, torch.device("cpu"))
    net, model, _ = H.build(cfg, "small", 10, "cpu")
    theta = [(w.detach(), b.detach()) for w, b in model.sample(4)]
    x, y = (t[:64] for t in data["test"])
    nll = lambda inputs: F.nll_loss(H.ensemble_log_probs(net, theta, inputs), y).item()
    pixels = x * data["std"] + data["mean"]
    for steps in (1, 5):                                                 # FGSM, PGD
        adv = H.attack(net, lambda t: theta, x, y, 0.05, steps, data, torch.Generator().manual_seed(0))
        adv_pixels = adv * data["std"] + data["mean"]
        assert nll(adv) > nll(x) and (adv_pixels - pixels).abs().max() <= 0.05 + 1e-5
        assert adv_pixels.min() >= -1e-6 and adv_pixels.max() <= 1 + 1e-6
    res = H.adversarial_evaluation(model, net, theta, data, cfg)
    assert set(res["pgd_fresh"]) == {str(e) for e in H.EPSILONS} and res["fresh_networks_differ"] is False
    assert res["pgd"]["0.3"]["accuracy"] <= res["clean_accuracy"]


def test_baselines_expose_the_same_sampling():
    template = H.small_net(10)
    before = template[0].weight.clone()
    ensemble = H.StandardEnsemble(template, 3)
    w = ensemble.sample(3)[0][0]
    assert all((w[i] - w[j]).abs().mean() > 0.5 * w.abs().mean() for i, j in ((0, 1), (0, 2), (1, 2)))
    assert torch.equal(template[0].weight, before)                      # independently initialised copies
    torch.testing.assert_close(ensemble.sample(2, first=1)[0][0], w[1:])  # sampling = taking members
    net = H.small_net(10, p=0.5)
    dropout, x = H.MCDropout(net), torch.randn(6, 1, 28, 28)
    a = H.sample_probs(dropout, net, x, 4, seed=5)
    assert (a[0] - a[1]).abs().max() > 1e-3                            # two masks, two predictions
    torch.testing.assert_close(H.sample_probs(dropout, net, x, 4, seed=5), a)    # the seed repeats the masks
    model = H.HyperGAN(H.small_net(10), hidden=32, mixer=False)
    assert isinstance(model.Q, torch.nn.Identity) and model.s_dim == 3 * H.D_DIM
    s = model.sample_s(5)
    torch.testing.assert_close(model.codes(s), s.view(5, 3, H.D_DIM))  # no mixer: z_i is the i-th slice of s


# ----- the command line, end to end ---------------------------------------------------------------------------------
def test_interrupted_run_is_refused_a_fresh_start_and_resumes_exactly(tmp_path, monkeypatch, capsys, trained):
    out, real_step, calls = tmp_path / "run", H.train_step, []

    def step_then_interrupt(*a, **k):                                    # Ctrl-C in the middle of epoch 2
        calls.append(1)
        if len(calls) == 30:
            raise KeyboardInterrupt
        return real_step(*a, **k)
    monkeypatch.setattr(H, "train_step", step_then_interrupt)
    assert "--resume" in fails(capsys, *FAST, "--out-dir", out)
    monkeypatch.undo()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    before = (out / "checkpoint.pt").read_bytes()
    msg = fails(capsys, *FAST, "--out-dir", out)                        # a fresh run into it is refused
    assert "--resume" in msg and "new --out-dir" in msg
    msg = fails(capsys, *FAST, "--out-dir", out, "--resume", "--shift", "0")
    assert "--shift 2" in msg and "this run has 0" in msg and (out / "checkpoint.pt").read_bytes() == before
    res, stdout = run(capsys, *FAST, "--out-dir", out, "--resume")      # it ends where the uninterrupted run ended
    assert "resumed" in stdout and "D(z)" in stdout and "ETA" in stdout and "paper (Table 2)" in stdout
    reference = torch.load(trained[0] / "checkpoint.pt", weights_only=True)["model"]
    for k, v in torch.load(out / "checkpoint.pt", weights_only=True)["model"].items():
        torch.testing.assert_close(v, reference[k], msg=k)
    for key in ("dataset", "method", "config", "accuracy", "nll", "disagreement", "ensemble_gain", "train_seconds",
                "steps_per_second", "networks_x_images_per_second", "eval_seconds", "peak_memory_mb", "history"):
        assert key in res, key
    assert set(res["accuracy"]["ensemble"]) == {"1", "5", "10", "100"} and res["accuracy"]["ensemble"]["100"] is None
    assert res["accuracy"]["ensemble"]["5"]["draws"] == 2 and len(res["history"]) == 2


def test_eval_only_with_ood_attacks_figures_and_export(tmp_path, monkeypatch, capsys, trained):
    out, res = trained
    monkeypatch.setattr(H, "ADV_IMAGES", 50)
    ckpt, nets, ev = out / "best.pt", tmp_path / "nets", tmp_path / "eval"
    results_json = (out / "results.json").read_bytes()
    assert "--out-dir" in fails(capsys, *FAST, "--eval-only", "--checkpoint", ckpt, "--out-dir", out)
    nm = tmp_path / "data" / "notMNIST_small"                            # a tiny notMNIST folder
    from PIL import Image
    for letter in "AB":
        (nm / letter).mkdir(parents=True)
        for i in range(3):
            Image.fromarray((torch.rand(28, 28) * 255).byte().numpy()).save(nm / letter / f"{i}.png")
    (nm / "A" / "broken.png").write_bytes(b"not a png")                # skipped, as in the real archive
    again, _ = run(capsys, *[a for a in FAST if a != "--no-figures"], "--eval-only", "--checkpoint", ckpt, "--out-dir",
                   ev, "--export", 3, nets, "--data-root", tmp_path / "data", "--ood", "noise,notmnist",
                   "--adversarial")
    assert (out / "results.json").read_bytes() == results_json         # the training run's results are untouched
    assert again["accuracy"] == res["accuracy"] and again["checkpoint"] == str(ckpt)
    assert again["ood"]["notmnist"]["n_out"] == 6 and again["ood"]["noise"]["auroc"] > 0.9
    for attack in ("fgsm", "pgd", "pgd_fresh"):
        assert set(again["adversarial"][attack]) == {str(e) for e in H.EPSILONS}
    assert again["adversarial"]["pgd"]["0.3"]["accuracy"] < again["adversarial"]["clean_accuracy"]
    for png in ("entropy_cdf.png", "diversity.png", "adversarial.png"):
        assert (ev / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (ev / png).stat().st_size > 10_000, png
    # an exported network runs alone in small_net(), on inputs normalised as the data (synthetic: mean 1/2, std 1/6)
    assert sorted(os.listdir(nets)) == ["net_000.pt", "net_001.pt", "net_002.pt"]
    module = H.small_net()
    module.load_state_dict(torch.load(nets / "net_000.pt", weights_only=True))
    x, y = H.synthetic_split((1, 28, 28), 1024, 2)
    assert (module((x - 0.5) * 6).argmax(-1) == y).float().mean() > 0.8
    assert "already holds exported networks" in fails(capsys, *FAST, "--eval-only", "--checkpoint", ckpt, "--out-dir",
                                                      tmp_path / "ev2", "--export", 2, nets)
    cfg = H.parse_args(FAST + ["--ood", "notmnist,noise", "--data-root", str(tmp_path / "none")])
    assert set(H.load_data(cfg, torch.device("cpu"))["ood"]) == {"noise"}    # an absent notMNIST is said, not replaced
    assert capsys.readouterr().out.startswith("ood notmnist: skipped")


@pytest.mark.parametrize("variant", [["--method", "dropout"], ["--method", "ensemble", "--networks-per-step", "4"],
                                     ["--no-mixer"], ["--beta", "0"], ["--dataset", "synthetic-cifar10"]])
def test_baselines_ablations_and_cifar_train_evaluate_and_export(tmp_path, capsys, variant):
    res, _ = run(capsys, *FAST, "--epochs", "1", *variant, "--out-dir", tmp_path / "run", "--export", 2, tmp_path / "n")
    assert res["accuracy"]["single_mean"] > (0.11 if "synthetic-cifar10" in variant else 0.5), res["accuracy"]
    assert res["method"] == (variant[1] if variant[0] == "--method" else "hypergan")
    assert res["history"][0]["diversity"]["disagreement"] >= 0
    module = H.mednet() if "synthetic-cifar10" in variant else H.small_net()       # the constructor the README names
    module.load_state_dict(torch.load(tmp_path / "n" / "net_001.pt", weights_only=True))


def test_toy_spread_is_larger_outside_the_data(tmp_path, capsys):
    res, _ = run(capsys, "--dataset", "toy", "--epochs", "400", "--out-dir", tmp_path)
    assert res["toy"]["spread_outside"] > 2 * res["toy"]["spread_inside"] and res["toy"]["train_mse"] < 40, res["toy"]
    assert (tmp_path / "toy.png").stat().st_size > 10_000


@pytest.mark.parametrize("method", ["hypergan", "ensemble"])
def test_two_processes_stay_identical_and_checkpoint_loads(tmp_path, capsys, method):
    out, extra = tmp_path / "ddp", ["--method", method, "--networks-per-step", "4"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(HERE, "hypergan.py"), *TINY, *extra, "--out-dir", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    sums = dict(re.findall(r"rank (\d)/2: parameter checksum ([-+.0-9e]+)", r.stdout))   # shared stdout: match
    assert sums.keys() == {"0", "1"} and sums["0"] == sums["1"], r.stdout
    assert json.load(open(out / "results.json"))["processes"] == 2
    run(capsys, *TINY, *extra, "--out-dir", tmp_path / "ev", "--eval-only", "--checkpoint", out / "best.pt")


# ----- bad input and interrupts: one `error:` line, exit code 2, nothing lost, before any long work ------------------
def test_the_process_fails_with_one_line_and_no_traceback(tmp_path):
    assert "--frobnicate" in one_line_error(cli("--frobnicate", check=False))
    msg = one_line_error(cli("--dataset", "mnist", "--data-root", str(tmp_path), "--no-download", "--out-dir",
                             str(tmp_path / "m"), check=False))
    assert "could not load mnist" in msg and str(tmp_path) in msg


@pytest.mark.parametrize("args, words", [
    (["--dataset", "imagenet"], "invalid choice"), (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--lr-d", "inf"], "--lr-d"), (["--beta", "-1"], "--beta"), (["--epochs", "0"], "--epochs"),
    (["--networks-per-step", "1"], "--networks-per-step"), (["--shift", "-2"], "--shift"),
    (["--init-spread", "nan"], "--init-spread"), (["--seed", "-3"], "--seed"), (["--hidden", "x"], "--hidden"),
    (["--eval-networks", "0"], "--eval-networks"), (["--export", "x", "nets"], "--export"), (["--export", "0", "n"], "--export"),
    (["--ood", "imagenet"], "unknown --ood"), (["--ood", "mnist5-9"], "--dataset mnist0-4"),
    (["--ood", "svhn"], "(3, 32, 32)"), (["--checkpoint", "x.pt"], "--eval-only"), (["--eval-only"], "--checkpoint"),
    (["--resume"], "no checkpoint.pt"), (["--dataset", "toy", "--ood", "noise"], "toy"),
    (["--dataset", "toy", "--export", "2", "n"], "toy"), (["--dataset", "toy", "--resume"], "toy"),
    (["--repulsion", "-1"], "--repulsion"), (["--repulsion", "nan"], "--repulsion"),
    (["--repulsion", "1", "--method", "ensemble"], "--repulsion"), (["--dataset", "toy", "--repulsion", "1"], "toy")])
def test_bad_options_fail_fast_and_write_nothing(tmp_path, capsys, args, words):
    out = tmp_path / "out"
    assert words in fails(capsys, *TINY, "--out-dir", out, *args)
    assert not out.exists() or not os.listdir(out)


def test_bad_paths_and_files_fail_fast(tmp_path, capsys, trained):
    (tmp_path / "file").write_text("mine")
    assert "not a writable folder" in fails(capsys, *TINY, "--out-dir", tmp_path / "file")
    assert "not a writable folder" in fails(capsys, *TINY, "--out-dir", tmp_path / "file" / "sub")
    assert "--export PATH" in fails(capsys, *TINY, "--out-dir", tmp_path / "o", "--export", 2, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"
    if not torch.cuda.is_available():
        assert "--device cuda" in fails(capsys, *TINY, "--device", "cuda", "--out-dir", tmp_path / "d")
    for content in (b"not a checkpoint", b""):
        (tmp_path / "bad.pt").write_bytes(content)
        assert "not a readable" in fails(capsys, *TINY, "--eval-only", "--checkpoint", tmp_path / "bad.pt", "--out-dir",
                                         tmp_path / "e")
    torch.save(dict(format=1, config={}), tmp_path / "old.pt")
    assert "format 1" in fails(capsys, *TINY, "--eval-only", "--checkpoint", tmp_path / "old.pt", "--out-dir", tmp_path / "e")
    for args, words in ((["--hidden", "32"], "--hidden 64"), (["--dataset", "synthetic-cifar10"], "--dataset"),
                        (["--method", "dropout"], "--method"), (["--no-mixer"], "--mixer")):
        assert words in fails(capsys, *FAST, *args, "--eval-only", "--checkpoint", trained[0] / "best.pt", "--out-dir",
                              tmp_path / "e")
    raw = tmp_path / "mnist" / "MNIST" / "raw"                           # corrupt files: truncated and empty
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"\x00\x00\x08\x03\x00" if "train" in name else b"")
    assert "could not load mnist" in fails(capsys, "--dataset", "mnist", "--data-root", tmp_path / "mnist",
                                           "--no-download", "--out-dir", tmp_path / "c")


@pytest.mark.parametrize("phase", ["pretraining", "checkpoint", "evaluation", "non-finite"])
def test_ctrl_c_or_a_failed_step_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys, trained, phase):
    out, before = tmp_path / "run", None
    if phase != "pretraining":                                           # a copy of the finished run
        shutil.copytree(trained[0], out)
        before = (out / "checkpoint.pt").read_bytes()

    def interrupted_write(obj, path, *a, **k):                           # Ctrl-C halfway through writing a file
        open(path, "wb").write(b"half a checkpoint")
        raise KeyboardInterrupt
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    if phase == "non-finite":
        real_ce = F.cross_entropy
        monkeypatch.setattr(H.F, "cross_entropy", lambda *a, **k: real_ce(*a, **k) * float("nan"))
    elif phase == "checkpoint":
        monkeypatch.setattr(H.torch, "save", interrupted_write)
    else:
        monkeypatch.setattr(H, dict(pretraining="pretrain_mixer", evaluation="evaluate")[phase], interrupt)
    more = dict(pretraining=[], checkpoint=["--resume", "--epochs", "3"], evaluation=["--resume"],
                **{"non-finite": ["--resume", "--epochs", "3"]})[phase]   # evaluation: the finished run's only
    msg = fails(capsys, *FAST, "--out-dir", out, *more)
    assert ("non-finite" if phase == "non-finite" else "interrupted") in msg
    if before:
        assert (out / "checkpoint.pt").read_bytes() == before
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
