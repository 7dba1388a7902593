"""Tests for hypergan.py: offline (synthetic data only), CPU, the whole file in a few minutes.
Run: python -m pytest -q test_hypergan.py"""
import contextlib
import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import hypergan as H

HERE = os.path.dirname(os.path.abspath(__file__))
# A short synthetic run: 2 epochs of 8 networks x 8 images, small evaluation, no figures.
FAST = ["--dataset", "synthetic-mnist", "--epochs", "2", "--networks-per-step", "8", "--images-per-network", "8",
        "--eval-networks", "10", "--val-networks", "2", "--pretrain-steps", "5", "--hidden", "64", "--d-dim", "16",
        "--s-dim", "16", "--no-figures"]


def cli(*args, check=True):
    """Runs hypergan.py as a user would: a subprocess. Returns the CompletedProcess."""
    r = subprocess.run([sys.executable, os.path.join(HERE, "hypergan.py"), *args], capture_output=True, text=True,
                       timeout=240)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(params=["small", "mednet"])
def arch(request):
    return request.param


def make(arch, K=4, seed=0):
    torch.manual_seed(seed)
    net = H.TARGETS[arch](10)
    model = H.HyperGAN(net, s_dim=16, d_dim=8, hidden=32)
    theta = model.generate(model.codes(model.sample_s(K)))
    shape = (1, 28, 28) if arch == "small" else (3, 32, 32)
    return net, model, theta, shape


# ----- the method's pieces -----------------------------------------------------------------------
def test_generated_shapes_equal_target_parameters(arch):
    net, model, theta, _ = make(arch, K=3)
    params = list(net.parameters())
    assert len(params) == 2 * len(theta)
    for (w, b), pw, pb in zip(theta, params[0::2], params[1::2]):
        assert w.shape == (3, *pw.shape) and b.shape == (3, *pb.shape)


def paper_order(module):
    """The same layers with each (pool, activation) pair swapped back to the paper's
    (activation, pool): the batched forward must match it too (the swap is exact)."""
    layers = list(module)
    for i in range(len(layers) - 1):
        if isinstance(layers[i], torch.nn.MaxPool2d) and isinstance(layers[i + 1], (torch.nn.ReLU, torch.nn.LeakyReLU)):
            layers[i], layers[i + 1] = layers[i + 1], layers[i]
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize("shared", [False, True])
def test_batched_forward_equals_nn_module(arch, shared):
    net, model, theta, shape = make(arch, K=3)
    x = torch.randn(3, 5, *shape)
    batched = H.functional_forward(net, theta, x[0] if shared else x)       # (K, B, classes)
    for k in range(3):
        module = H.TARGETS[arch](10)
        module.load_state_dict(H.theta_to_state_dict(net, theta, k))
        reference = paper_order(module)
        expected = reference(x[0] if shared else x[k])
        torch.testing.assert_close(batched[k], expected, rtol=1e-4, atol=1e-5)


def test_gradients_reach_mixer_and_every_generator(arch):
    net, model, _, shape = make(arch, K=4)
    z, theta = model(model.sample_s(4))
    logits = H.functional_forward(net, theta, torch.randn(4, 2, *shape))
    loss = F.cross_entropy(logits.flatten(0, 1), torch.randint(10, (8,))) + \
        H.mixer_adversarial_loss(H.discriminator(8, 32), z)
    loss.backward()
    for name, module in [("Q", model.Q)] + [(f"G{i}", g) for i, g in enumerate(model.G)]:
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads), name
        assert sum(g.abs().sum() for g in grads) > 0, name


class ConstantD(torch.nn.Module):
    """A 'discriminator' whose logit is a fixed number per input row: hand-checkable Eq. (3)."""

    def forward(self, x):
        return x[..., :1]  # the first coordinate is the logit


def test_eq3_value_and_signs_by_hand():
    D = ConstantD()
    # one sample (K=1), N=2 layers; logits: prior 0 and ln 3, codes 0 and -ln 3
    p = torch.tensor([[[0.0], [math.log(3)]]])
    z = torch.tensor([[[0.0], [-math.log(3)]]])
    # D(p) = 1/2, 3/4 ; D(z) = 1/2, 1/4  ->  Dist = -(log 1/2 + log 1/2 + log 3/4 + log 3/4)
    expected = -(2 * math.log(0.5) + 2 * math.log(0.75))
    assert H.discriminator_loss(D, z, p).item() == pytest.approx(expected, rel=1e-6)
    # Q minimises sum_i log(1 - D(z_i)) = log 1/2 + log 3/4
    assert H.mixer_adversarial_loss(D, z).item() == pytest.approx(math.log(0.5) + math.log(0.75), rel=1e-6)
    # signs: a D that scores the prior higher has a lower loss; codes that look more like the prior
    # (higher D(z)) give Q a lower loss
    assert H.discriminator_loss(D, z - 1, p + 1) < H.discriminator_loss(D, z, p)
    assert H.mixer_adversarial_loss(D, z + 1) < H.mixer_adversarial_loss(D, z)


def test_r1_penalty_by_hand():
    # a linear D, logit = w . x + c: the gradient with respect to every prior code p_i is w, so the
    # penalty (the mean over prior samples) is gamma/2 * |w|^2 whatever p and z are
    D = torch.nn.Linear(4, 1)
    z, p = torch.randn(5, 3, 4), torch.randn(5, 3, 4)
    extra = H.discriminator_loss(D, z, p, r1=2.0) - H.discriminator_loss(D, z, p)
    assert extra.item() == pytest.approx(2.0 / 2 * D.weight.pow(2).sum().item(), rel=1e-5)
    extra.backward()                                  # and it trains D: d/dw of gamma/2 * |w|^2
    torch.testing.assert_close(D.weight.grad, 2.0 * D.weight.detach())


def test_code_batch_feeds_c_codes_to_d_and_k_networks_to_the_target():
    torch.manual_seed(0)
    net = H.small_net(10)
    model, D = H.HyperGAN(net, s_dim=16, d_dim=8, hidden=32), H.discriminator(8, 32)
    seen = []
    D.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    cfg = H.parse_args(["--dataset", "synthetic-mnist", "--code-batch", "24", "--r1", "1"])
    opts, _ = H.make_optimizers(model, D, cfg, 10)
    x, y = torch.randn(4, 2, 1, 28, 28), torch.randint(0, 10, (4, 2))
    stats = H.train_step(model, D, net, opts, x, y, 1.0, contextlib.nullcontext(), code_batch=24, r1=1.0)
    assert torch.isfinite(stats).all()
    assert seen[0] == 2 * 24                          # D's step: 24 prior samples and 24 codes
    assert seen[1] == 24                              # Q's adversarial term: the 24 codes
    z, theta = model(model.sample_s(24), 4)
    assert z.shape == (24, 3, 8) and theta[0][0].shape == (4, 32, 1, 5, 5)


def test_different_noise_gives_different_networks():
    net, model, _, _ = make("small", K=2)
    model.eval()
    theta = model.generate(model.codes(model.sample_s(2)))
    for w, b in theta:
        assert (w[0] - w[1]).abs().mean() > 1e-3 * w.abs().mean()
    # eval mode: the same s gives the same network, alone or in a batch (BatchNorm uses running stats)
    s = model.sample_s(3)
    alone = model.generate(model.codes(s[:1]))[0][0]
    batch = model.generate(model.codes(s))[0][0][:1]
    torch.testing.assert_close(alone, batch)


def test_loss_falls_and_accuracy_rises_on_synthetic_task():
    cfg = H.parse_args(FAST + ["--epochs", "4"])
    device = torch.device("cpu")
    H.set_seed(0)
    data = H.load_data(cfg, device)
    net = H.TARGETS[data["arch"]](10)
    model, D = H.HyperGAN(net, cfg.s_dim, cfg.d_dim, cfg.hidden), H.discriminator(cfg.d_dim, cfg.hidden)
    before = H.evaluate(model, net, *data["test"], 10, seed=1, sizes=(1,))["single_mean"]
    total = len(data["train"][0]) // 64 * cfg.epochs
    opts, sched = H.make_optimizers(model, D, cfg, total)
    x, y = data["train"]
    ce = []
    for step in range(total):
        idx = torch.randint(len(x), (64,))
        stats = H.train_step(model, D, net, opts, x[idx].view(8, 8, 1, 28, 28), y[idx].view(8, 8), cfg.beta,
                             torch.autocast("cpu", enabled=False))
        sched.step()
        ce.append(stats[0].item())
    after = H.evaluate(model, net, *data["test"], 10, seed=1, sizes=(1,))["single_mean"]
    assert sum(ce[-20:]) / 20 < 0.5 * sum(ce[:20]) / 20
    assert before < 0.2 and after > 0.6, (before, after)


def test_batched_evaluation_equals_per_network_evaluation():
    net, model, _, shape = make("small")
    model.eval()
    x = torch.randn(7, *shape)
    probs = H.sample_probs(model, net, x, n_networks=5, seed=3, nets_per_chunk=2, images_per_chunk=3)
    theta = model.generate(model.codes(model.sample_s(5, torch.Generator().manual_seed(3))))
    for k in range(5):
        module = H.small_net(10)
        module.load_state_dict(H.theta_to_state_dict(net, theta, k))
        torch.testing.assert_close(probs[k], module(x).softmax(-1), rtol=1e-4, atol=1e-6)


def test_ensemble_metrics_by_hand():
    # 4 networks, 3 images, 2 classes
    probs = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]],
                          [[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]],
                          [[0.7, 0.3], [0.4, 0.6], [0.2, 0.8]],
                          [[0.4, 0.6], [0.3, 0.7], [0.9, 0.1]]])
    y = torch.tensor([0, 1, 1])
    # image 0: votes (3, 1) -> 3 of 6 pairs differ; image 1: (1, 3) -> 3; image 2: (2, 2) -> 4
    assert H.disagreement(probs) == pytest.approx((3 + 3 + 4) / 18)
    # all-correct, fully confident predictions are perfectly calibrated
    assert H.expected_calibration_error(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])) == 0
    # confidence 0.9 at accuracy 1/2 -> ECE 0.4
    assert H.expected_calibration_error(torch.tensor([[0.9, 0.1], [0.9, 0.1]]), torch.tensor([0, 1])) == \
        pytest.approx(0.4)


def test_augment_crops_and_flips_rows_of_the_padded_image():
    # every pixel holds its column number 1..32; padding is -1 ("black")
    x = torch.arange(1.0, 33.0).expand(64, 3, 32, 32).clone()
    out = H.augment_batch(x, torch.full((3, 1, 1), -1.0), 4, True, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    flips = 0
    for img in out:
        row = img[0, 16]
        inside = row[row > 0]
        steps = (inside[1:] - inside[:-1]).unique().tolist()
        assert steps in ([1.0], [-1.0]), row            # a contiguous run of columns, maybe reversed
        assert 28 <= len(inside) <= 32 and set(row[row <= 0].tolist()) <= {-1.0}
        assert (img[:, 4:28] == row).all()               # the same shift for every inner row and channel
        flips += steps == [-1.0]
    assert 0 < flips < 64                                # both flipped and unflipped images occur


def test_augment_shifts_digits_without_flipping_them():
    # MNIST's --shift 2: whole images move by -2..2 pixels each way; a digit is never mirrored
    x = torch.arange(1.0, 29.0).expand(256, 1, 28, 28).clone()
    x = x + 100 * torch.arange(1.0, 29.0)[:, None]                  # pixel (r, c) holds 100 (r+1) + c+1
    out = H.augment_batch(x, torch.full((1, 1, 1), -1.0), 2, False, torch.Generator().manual_seed(0))
    moves = set()
    for img in out[:, 0]:
        inside = img[img > 0].view(-1)
        r0, c0 = divmod(int(inside.min()) - 101, 100)               # the original pixel now at the top left
        rows, cols = (img > 0).any(1).nonzero(), (img > 0).any(0).nonzero()
        dy, dx = int(rows[0]) - r0, int(cols[0]) - c0               # where it went
        assert -2 <= dy <= 2 and -2 <= dx <= 2
        kept = x[0, 0, max(0, -dy):28 - max(0, dy), max(0, -dx):28 - max(0, dx)]
        assert torch.equal(img[max(0, dy):28 + min(0, dy), max(0, dx):28 + min(0, dx)], kept)
        assert (img <= 0).sum() == 28 * 28 - kept.numel()            # the rest is black border
        moves.add((dy, dx))
    assert len(moves) == 25                                          # every shift occurs


# ----- the command line, end to end ------------------------------------------------------------
def test_cli_train_resume_eval_export(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    # an uninterrupted 2-epoch run is the reference
    straight = str(tmp_path / "straight")
    r = cli(*FAST, "--out-dir", straight)
    assert "ce" in r.stdout and "D(z)" in r.stdout and "ms/step" in r.stdout
    reference = torch.load(os.path.join(straight, "checkpoint.pt"), weights_only=True)
    # the same run, interrupted (Ctrl-C) right after epoch 1's checkpoint ...
    real_save = H.save_checkpoint

    def save_then_interrupt(path, *a):
        real_save(path, *a)
        if path.endswith("checkpoint.pt"):
            raise KeyboardInterrupt
    monkeypatch.setattr(H, "save_checkpoint", save_then_interrupt)
    with pytest.raises(SystemExit) as e:
        H.main(FAST + ["--out-dir", out])
    assert e.value.code != 0
    monkeypatch.undo()
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["epoch"] == 1
    # ... resumed with another training option: refused, and the checkpoint is left as it was
    before = open(os.path.join(out, "checkpoint.pt"), "rb").read()
    msg = one_line_error(cli(*FAST, "--out-dir", out, "--resume", "--shift", "0", check=False))
    assert "--shift 2" in msg and "this run has 0" in msg
    assert open(os.path.join(out, "checkpoint.pt"), "rb").read() == before
    # ... and resumed with the same options: it ends exactly where the uninterrupted run ended
    cli(*FAST, "--out-dir", out, "--resume")
    resumed = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert resumed["epoch"] == 2
    for k, v in reference["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, msg=k)
    res = json.load(open(os.path.join(out, "results.json")))
    for key in ("dataset", "config", "nll", "ece", "train_seconds", "steps_per_second", "peak_memory_mb"):
        assert key in res
    assert set(res["accuracy"]["ensemble"]) == {"1", "5", "10", "100"}
    assert 0 <= res["accuracy"]["single_mean"] <= 1 and res["accuracy"]["ensemble"]["5"]["draws"] == 2
    # eval-only on the checkpoint, with export
    ev = str(tmp_path / "eval")
    r = cli(*FAST, "--out-dir", ev, "--eval-only", "--checkpoint", os.path.join(out, "checkpoint.pt"),
            "--export", "3", str(tmp_path / "nets"))
    again = json.load(open(os.path.join(ev, "results.json")))
    assert again["accuracy"]["single_mean"] == pytest.approx(res["accuracy"]["single_mean"], abs=0.05)
    files = sorted(os.listdir(tmp_path / "nets"))
    assert files == ["net_000.pt", "net_001.pt", "net_002.pt"]
    module = H.small_net(10)
    module.load_state_dict(torch.load(tmp_path / "nets" / "net_000.pt", weights_only=True))
    assert module(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_cli_synthetic_cifar_runs(tmp_path):
    r = cli(*FAST, "--dataset", "synthetic-cifar10", "--epochs", "1", "--out-dir", str(tmp_path))
    assert json.load(open(tmp_path / "results.json"))["dataset"] == "synthetic-cifar10"


# ----- bad input: one line, non-zero exit, no traceback, nothing overwritten ---------------------
def one_line_error(r):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_unknown_dataset_and_option():
    assert "invalid choice" in one_line_error(cli("--dataset", "imagenet", check=False))
    assert "--frobnicate" in one_line_error(cli("--frobnicate", check=False))
    assert "--networks-per-step" in one_line_error(cli(*FAST, "--networks-per-step", "1", check=False))
    assert "positive number" in one_line_error(cli(*FAST, "--export", "x", "nets", check=False))
    assert "--r1" in one_line_error(cli(*FAST, "--r1", "-1", check=False))


def test_missing_data_offline(tmp_path):
    msg = one_line_error(cli("--dataset", "mnist", "--data-root", str(tmp_path), "--no-download", check=False))
    assert "mnist" in msg and str(tmp_path) in msg


def test_corrupt_and_mismatched_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert "not a readable" in one_line_error(cli(*FAST, "--eval-only", "--checkpoint", str(bad), check=False))
    out = str(tmp_path / "run")
    cli(*FAST, "--epochs", "1", "--out-dir", out)
    ckpt = os.path.join(out, "checkpoint.pt")
    msg = one_line_error(cli(*FAST, "--d-dim", "32", "--eval-only", "--checkpoint", ckpt, check=False))
    assert "--d-dim" in msg
    msg = one_line_error(cli(*FAST, "--dataset", "synthetic-cifar10", "--eval-only", "--checkpoint", ckpt, check=False))
    assert "--dataset" in msg


def test_checkpoint_from_before_d_left_the_model_still_loads(tmp_path):
    model, D = H.HyperGAN(H.small_net(10), s_dim=16, d_dim=8, hidden=32), H.discriminator(8, 32)
    old = dict(config={}, epoch=1, model={**model.state_dict(), **{"D." + k: v for k, v in D.state_dict().items()}})
    torch.save(old, tmp_path / "old.pt")                            # the layout of commits up to 45753d2
    ckpt = H.load_checkpoint(str(tmp_path / "old.pt"))
    model.load_state_dict(ckpt["model"])                            # strict: no D.* entries left over
    D.load_state_dict(ckpt["D"])


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    H.main(FAST + ["--epochs", "1", "--out-dir", out])
    before = open(os.path.join(out, "checkpoint.pt"), "rb").read()
    real_ce = F.cross_entropy
    monkeypatch.setattr(H.F, "cross_entropy", lambda *a, **k: real_ce(*a, **k) * float("nan"))
    with pytest.raises(SystemExit) as e:
        H.main(FAST + ["--epochs", "2", "--out-dir", out, "--resume"])
    assert e.value.code != 0
    assert "non-finite" in capsys.readouterr().err
    assert open(os.path.join(out, "checkpoint.pt"), "rb").read() == before


# ----- several processes (torchrun, gloo on CPU) ------------------------------------------------
@pytest.mark.parametrize("method", ["hypergan", "ensemble"])
def test_two_processes_stay_identical_and_checkpoint_loads(tmp_path, method):
    out = str(tmp_path / "ddp")
    # HyperGAN with the R1 penalty and a code batch: the double backward through DDP (section 8)
    extra = ["--method", method] + (["--networks-per-step", "4", "--epochs", "1"] if method == "ensemble" else
                                    ["--code-batch", "32", "--r1", "1"])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(HERE, "hypergan.py"), *FAST, *extra, "--out-dir", out],
                       capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    # the two processes share stdout, so a line of one can run into a line of the other: match, not split
    sums = dict(re.findall(r"rank (\d)/2: parameter checksum ([-+.0-9e]+)", r.stdout))
    assert sums.keys() == {"0", "1"} and sums["0"] == sums["1"], r.stdout
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["processes"] == 2
    ce = [h["train"]["ce"] for h in res["history"]]
    assert ce[-1] < ce[0] if len(ce) > 1 else res["accuracy"]["single_mean"] > 0.5, ce
    ev = cli(*FAST, *extra, "--out-dir", str(tmp_path / "eval"), "--eval-only", "--checkpoint",
             os.path.join(out, "checkpoint.pt"))
    assert "test set" in ev.stdout


# ----- uncertainty: baselines, OOD and adversarial detection, diversity, the toy (issue 3) ------
def test_entropy_of_uniform_and_one_hot():
    assert H.entropy(torch.full((7,), 1 / 7)).item() == pytest.approx(math.log(7))
    assert H.entropy(F.one_hot(torch.tensor(3), 7).float()).item() == 0
    assert H.entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]])).tolist() == pytest.approx([math.log(2), 0])


def test_auroc_and_fpr95_by_hand():
    # positives above every negative / below every negative / all tied
    assert H.auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4])) == 1
    assert H.auroc(torch.tensor([0.3, 0.4]), torch.tensor([0.1, 0.2])) == 0
    assert H.auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])) == 0.5
    # neg (1, 2, 3), pos (2, 4): pairs pos > neg: 2>1 (1), 2=2 (1/2), 4>all (3) -> 4.5 of 6
    assert H.auroc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0])) == pytest.approx(4.5 / 6)
    # 20 positives: the threshold keeping 19 of them (95 %) is the 19th highest score
    pos = torch.arange(1.0, 21.0)                                  # 1..20 -> threshold 2
    assert H.fpr_at_95_tpr(torch.tensor([0.5, 1.0, 2.0, 3.0]), pos) == 0.5   # 2 and 3 are flagged
    # ties at the threshold are flagged: every negative equals it
    assert H.fpr_at_95_tpr(torch.full((4,), 2.0), pos) == 1
    assert H.fpr_at_95_tpr(torch.tensor([0.0, 1.0]), pos) == 0


@pytest.fixture(scope="module")
def trained_ensemble(tmp_path_factory):
    """A tiny standard ensemble (4 members) trained by the CLI, loaded back with its data."""
    out = str(tmp_path_factory.mktemp("ens"))
    cli(*FAST, "--method", "ensemble", "--networks-per-step", "4", "--eval-networks", "4", "--out-dir", out)
    cfg = H.parse_args(FAST + ["--method", "ensemble", "--networks-per-step", "4", "--uq-networks", "4"])
    data = H.load_data(cfg, torch.device("cpu"))
    net = H.small_net(10)
    model, _ = H.build_model(cfg, net)
    model.load_state_dict(torch.load(os.path.join(out, "best.pt"), weights_only=True)["model"])
    return out, cfg, data, net, model


def test_fgsm_raises_loss_within_eps_and_pixel_range(trained_ensemble):
    _, cfg, data, net, model = trained_ensemble
    x, y = (t[:64] for t in data["test"])
    theta = [(w.detach(), b.detach()) for w, b in model.sample(4)]
    eps = 0.05
    adv = H.attack(net, lambda t: theta, x, y, eps, 1, data)
    nll = lambda inputs: F.nll_loss(H.ensemble_log_probs(net, theta, inputs), y).item()
    assert nll(adv) > nll(x)
    pixels, adv_pixels = (t * data["std"] + data["mean"] for t in (x, adv))
    assert (adv_pixels - pixels).abs().max() <= eps + 1e-5
    assert adv_pixels.min() >= -1e-6 and adv_pixels.max() <= 1 + 1e-6
    # PGD (several steps from a random start) obeys the same bounds and hurts at least as much here
    pgd = H.attack(net, lambda t: theta, x, y, eps, 5, data, torch.Generator().manual_seed(0))
    assert ((pgd * data["std"] + data["mean"]) - pixels).abs().max() <= eps + 1e-5
    assert nll(pgd) > nll(x)
    # an attack too small to flip anything: accuracy unchanged, nothing to detect (AUROC null)
    cfg = H.parse_args(FAST + ["--epsilons", "1e-6", "--adv-images", "32", "--pgd-steps", "2"])
    res = H.adversarial_evaluation(model, net, theta, data, cfg)
    for attack in ("fgsm", "pgd", "pgd_fresh"):
        r = res[attack]["1e-06"]
        assert r["auroc"] is None and r["accuracy"] == pytest.approx(res["clean_accuracy"]) and r["success_rate"] == 0


def test_standard_ensemble_members_are_independent_and_fixed(trained_ensemble, tmp_path):
    # independently initialised: members differ before any training, the template net is untouched
    template = H.small_net(10)
    before = template[0].weight.clone()
    w0 = H.StandardEnsemble(template, 3).sample(3)[0][0]
    assert all((w0[i] - w0[j]).abs().mean() > 0.5 * w0.abs().mean() for i, j in ((0, 1), (0, 2), (1, 2)))
    assert torch.equal(template[0].weight, before)
    out, cfg, data, net, model = trained_ensemble
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["method"] == "ensemble" and res["accuracy"]["single_mean"] > 0.6
    assert res["accuracy"]["ensemble"]["100"] is None                 # only 4 members
    theta = model.sample(4)
    w = theta[0][0]
    assert (w[0] - w[1]).abs().mean() > 0.1 * w.abs().mean()         # independently initialised
    torch.testing.assert_close(model.sample(2, first=2)[0][0], w[2:])  # sampling = taking members
    with pytest.raises(H.UserError):
        model.sample(3, first=2)
    # its checkpoint evaluates through the same --eval-only path; the member count comes from it
    ev = cli(*FAST, "--method", "ensemble", "--eval-only", "--checkpoint", os.path.join(out, "checkpoint.pt"),
             "--out-dir", str(tmp_path / "ev"))
    assert "test set, 4 sampled networks" in ev.stdout
    msg = one_line_error(cli(*FAST, "--method", "ensemble", "--resume", "--checkpoint",
                             os.path.join(out, "checkpoint.pt"),
                             "--out-dir", str(tmp_path / "ev2"), check=False))
    assert "--networks-per-step" in msg


def test_dropout_masks_differ_but_repeat_with_the_seed():
    cfg = H.parse_args(FAST + ["--method", "dropout"])
    net = H.small_net(10, p=0.5)
    model, D = H.build_model(cfg, net)
    assert D is None and isinstance(model, H.MCDropout)
    x = torch.randn(6, 1, 28, 28)
    a = H.sample_probs(model, net, x, 4, seed=5)
    assert (a[0] - a[1]).abs().max() > 1e-3                            # two masks, two predictions
    torch.testing.assert_close(H.sample_probs(model, net, x, 4, seed=5), a)
    # run through the same architecture without dropout layers, the 'networks' are one network
    b = H.sample_probs(model, H.small_net(10), x, 2, seed=5)
    torch.testing.assert_close(b[0], b[1])


def test_no_mixer_gives_independent_codes():
    net = H.small_net(10)
    model = H.HyperGAN(net, s_dim=16, d_dim=8, hidden=32, mixer=False)
    assert isinstance(model.Q, torch.nn.Identity) and model.s_dim == 3 * 8
    s = model.sample_s(5)
    torch.testing.assert_close(model.codes(s), s.view(5, 3, 8))      # z_i = the i-th slice of the noise
    assert H.pretrain_mixer(model, 5) is None                         # nothing to pre-train


def test_lr_q_gives_the_mixer_its_own_rate():
    net = H.small_net(10)
    model, D = H.HyperGAN(net, s_dim=16, d_dim=8, hidden=32), H.discriminator(8, 32)
    cfg = H.parse_args(["--dataset", "synthetic-mnist", "--lr", "1e-3"])
    (opt_qg, _), _ = H.make_optimizers(model, D, cfg, 10)
    assert len(opt_qg.param_groups) == 1 and opt_qg.param_groups[0]["lr"] == 1e-3     # no --lr-q: one rate
    cfg = H.parse_args(["--dataset", "synthetic-mnist", "--lr", "1e-3", "--lr-q", "1e-5"])
    (opt_qg, _), _ = H.make_optimizers(model, D, cfg, 10)
    rest, q = opt_qg.param_groups
    assert {id(p) for p in q["params"]} == {id(p) for p in model.Q.parameters()}
    assert len(rest["params"]) + len(q["params"]) == len(list(model.parameters()))   # each once
    assert (rest["lr"], q["lr"]) == (1e-3, 1e-5)


def test_ood_and_adversarial_end_to_end_fill_results_and_figures(tmp_path):
    out = tmp_path / "uq"
    nm = tmp_path / "data" / "notMNIST_small"                           # a tiny notMNIST folder
    from PIL import Image
    for letter in "AB":
        (nm / letter).mkdir(parents=True)
        for i in range(3):
            Image.fromarray((torch.rand(28, 28) * 255).byte().numpy()).save(nm / letter / f"{i}.png")
    (nm / "A" / "broken.png").write_bytes(b"not a png")               # skipped, as in the real archive
    r = cli(*[a for a in FAST if a != "--no-figures"], "--data-root", str(tmp_path / "data"),
            "--ood", "noise,notmnist", "--adversarial", "--adv-images", "64", "--epsilons", "0.05,0.3",
            "--pgd-steps", "2", "--uq-networks", "4", "--out-dir", str(out))
    res = json.load(open(out / "results.json"))
    for name in ("noise", "notmnist"):
        o = res["ood"][name]
        assert {"auroc", "fpr95", "entropy_in_mean", "entropy_out_mean"} <= o.keys() and 0 <= o["auroc"] <= 1
    assert res["ood"]["notmnist"]["n_out"] == 6
    assert res["ood"]["noise"]["auroc"] > 0.9                          # noise is easy to tell apart
    adv = res["adversarial"]
    for attack in ("fgsm", "pgd", "pgd_fresh"):
        assert set(adv[attack]) == {"0.05", "0.3"}
        assert adv[attack]["0.3"]["accuracy"] <= adv["clean_accuracy"]
    assert len(res["history"]) == 2 and 0 <= res["history"][-1]["diversity"]["disagreement"] <= 1
    assert len(res["history"][-1]["diversity"]["weight_norm_rsd"]) == 3
    for png in ("entropy_cdf.png", "diversity.png", "adversarial.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
    # --compare pools runs of one setting (here the same run twice) and draws the same figures
    cmp = cli("--compare", str(out), str(out), "--out-dir", str(tmp_path / "cmp"))
    summary = json.load(open(tmp_path / "cmp" / "comparison.json"))["settings"]["hypergan"]
    assert summary["runs"] == 2 and summary["ood"]["noise"]["auroc"]["std"] == 0
    assert (tmp_path / "cmp" / "entropy_cdf.png").stat().st_size > 10_000 and "hypergan: 2 run(s)" in cmp.stdout


def test_missing_notmnist_is_skipped_with_a_message_not_replaced(tmp_path, capsys):
    cfg = H.parse_args(FAST + ["--ood", "notmnist,noise", "--data-root", str(tmp_path)])
    data = H.load_data(cfg, torch.device("cpu"))
    assert set(data["ood"]) == {"noise"} and "skipped" in data["ood_skipped"]["notmnist"]
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("ood notmnist: skipped")


@pytest.mark.parametrize("variant", [["--method", "dropout"], ["--no-mixer"], ["--beta", "0"]])
def test_baseline_and_ablations_train_and_evaluate(tmp_path, variant):
    cli(*FAST, "--epochs", "1", *variant, "--out-dir", str(tmp_path))
    res = json.load(open(tmp_path / "results.json"))
    assert res["accuracy"]["single_mean"] > 0.5
    assert res["method"] == (variant[1] if variant[0] == "--method" else "hypergan")
    assert res["history"][0]["diversity"]["disagreement"] >= 0


def test_compare_pools_seeds_and_names_what_differs(tmp_path):
    # hand-written results.json files: two seeds of one setting, one run with another D rate, and
    # one written before --r1 existed (its missing option counts as the default, so it pools)
    cfg = dataclasses.asdict(H.parse_args(["--dataset", "synthetic-mnist"]))
    # Two more: one without augmentation, and one written before --shift existed, when MNIST-shaped
    # data had none (so it pools with --shift 0, not with today's default of 2)
    runs = {"a0": dict(cfg, seed=0), "a1": dict(cfg, seed=1), "b": dict(cfg, lr_d=1e-4),
            "old": {k: v for k, v in dict(cfg, seed=2).items() if k != "r1"},
            "s0": dict(cfg, shift=0),
            "older": {k: v for k, v in dict(cfg, seed=1).items() if k != "shift"}}
    for name, c in runs.items():
        os.makedirs(tmp_path / name)
        acc = dict(single_mean=0.9, single_std=0.0, ensemble={m: dict(mean=0.9, std=0.0) for m in ("5", "10", "100")})
        json.dump(dict(method="hypergan", dataset="synthetic-mnist", config=c, accuracy=acc, train_seconds=1.0),
                  open(tmp_path / name / "results.json", "w"))
    out = cli("--compare", *(str(tmp_path / n) for n in runs), "--out-dir", str(tmp_path / "cmp"),
              "--no-figures").stdout
    assert "hypergan (--shift 2, --lr-d 0.001): 3 run(s), seeds [0, 1, 2]" in out
    assert "hypergan (--shift 2, --lr-d 0.0001): 1 run(s), seeds [0]" in out
    assert "hypergan (--shift 0, --lr-d 0.001): 2 run(s), seeds [0, 1]" in out


def test_uncertainty_bad_input():
    assert "unknown --ood" in one_line_error(cli(*FAST, "--ood", "imagenet", check=False))
    assert "--dataset mnist0-4" in one_line_error(cli(*FAST, "--ood", "mnist5-9", check=False))
    assert "--epsilons" in one_line_error(cli(*FAST, "--epsilons", "0.1,big", check=False))
    assert "--dropout" in one_line_error(cli(*FAST, "--method", "dropout", "--dropout", "0", check=False))
    msg = one_line_error(cli(*FAST, "--method", "ensemble", "--networks-per-step", "4", "--ood", "noise", check=False))
    assert "--uq-networks" in msg
    assert "results.json" in one_line_error(cli("--compare", "/nonexistent", check=False))


def test_toy_spread_is_larger_outside_the_data(tmp_path):
    cli("--dataset", "toy", "--epochs", "600", "--out-dir", str(tmp_path))
    toy = json.load(open(tmp_path / "results.json"))["toy"]
    assert toy["spread_outside"] > 2 * toy["spread_inside"], toy
    assert toy["train_mse"] < 40                                     # fits the points (noise variance 9)
    assert (tmp_path / "toy.png").stat().st_size > 10_000


@pytest.mark.parametrize("option", [["--shift", "2"], ["--eval-only"], ["--export", "2", "nets"]])
def test_toy_refuses_options_for_images(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as e:
        H.main(["--dataset", "toy", "--out-dir", str(tmp_path), *option])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and option[0] in err[0] and "toy" in err[0], err
    assert not os.listdir(tmp_path)                                  # nothing trained, nothing written
