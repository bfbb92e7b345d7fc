"""Stage 2: head registry contract, metrics against hand-computed values, training machinery."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_cache
from typer.testing import CliRunner

from ekx import EkxError
from ekx.cli import app
from ekx.heads import checkpoint as ck
from ekx.heads import config as hc
from ekx.heads import epoch as ep
from ekx.heads import metrics, models, runlog
from ekx.heads import train as tr
from ekx.heads.evaluate import evaluate_run, submission

runner = CliRunner()


@pytest.mark.parametrize("name", sorted(models.REGISTRY))
def test_every_head_keeps_the_contract(name):
    torch.manual_seed(0)
    model = models.create(name, dim=48, num_verbs=97, num_nouns=300, frames=16, dropout=0.3, drop_path=0.1)
    x = torch.randn(3, 16, 48, requires_grad=True)
    out = model(x)
    assert set(out) == {"verb", "noun"}
    assert out["verb"].shape == (3, 97) and out["noun"].shape == (3, 300)
    (out["verb"].sum() + out["noun"].sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    model.eval()
    flipped = model(x.flip(1))["verb"]
    same = torch.allclose(model(x)["verb"], flipped, atol=1e-5)
    assert same == (name == "pooling"), "only average pooling may be blind to frame order"


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match=r"already registered"):
        models.register("lstm")(object)
    with pytest.raises(EkxError, match=r"unknown head 'gru'"):
        models.create("gru", dim=4, num_verbs=2, num_nouns=2, frames=4)


# ---------------------------------------------------------------- metrics, by hand


def test_topk_and_action_scores_by_hand():
    # 3 segments, 3 verbs, 2 nouns
    verb = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.15, 0.05, 0.8]]))
    noun = torch.log(torch.tensor([[0.7, 0.3], [0.45, 0.55], [0.9, 0.1]]))
    verbs, nouns = torch.tensor([1, 1, 0]), torch.tensor([0, 0, 1])
    m = metrics.compute(verb, noun, verbs, nouns)
    assert m["verb_top1"] == pytest.approx(100 / 3)  # only segment 1
    assert m["noun_top1"] == pytest.approx(100 / 3)  # only segment 0
    # action scores, segment 0: (0,0)=.42 (1,0)=.21 (0,1)=.18 (1,1)=.09 (2,0)=.07 (2,1)=.03
    #   truth (1,0) is 2nd -> not top-1, in top-5
    # segment 1: (1,1)=.275 (1,0)=.225 (2,1)=.165 (2,0)=.135 (0,1)=.11 (0,0)=.09: truth (1,0) 2nd
    # segment 2: (2,0)=.72 (0,0)=.135 (2,1)=.08 (1,0)=.045 (0,1)=.015 (1,1)=.005: truth (0,1) 5th
    assert m["action_top1"] == 0.0
    assert m["action_top5"] == pytest.approx(100.0)
    assert m["verb_top5"] == 100.0 and m["noun_top5"] == 100.0


def test_action_topk_exact_against_the_full_product():
    torch.manual_seed(0)
    verb, noun = torch.randn(200, 97), torch.randn(200, 300)
    verbs, nouns = torch.randint(97, (200,)), torch.randint(300, (200,))
    full = (verb.softmax(1)[:, :, None] * noun.softmax(1)[:, None, :]).flatten(1)
    action = verbs * 300 + nouns
    for k in (1, 5):
        expect = (full.topk(k, 1).indices == action[:, None]).any(1)
        assert torch.equal(metrics.action_topk_correct(verb, noun, verbs, nouns, k), expect)


def test_tail_and_unseen_subsets_by_hand():
    verb = torch.eye(4)[[0, 1, 2, 3]] * 5  # predicts verbs 0,1,2,3
    noun = torch.eye(3)[[0, 1, 2, 0]] * 5  # predicts nouns 0,1,2,0
    verbs = torch.tensor([0, 1, 3, 3])  # segment 2 wrong verb
    nouns = torch.tensor([0, 2, 2, 0])  # segment 1 wrong noun
    m = metrics.compute(
        verb, noun, verbs, nouns, tail_verbs={3}, tail_nouns={2}, unseen=torch.tensor([False, True, True, False])
    )
    assert m["tail_verb_top1"] == pytest.approx(50.0)  # segments 2 (wrong), 3 (right)
    assert m["tail_noun_top1"] == pytest.approx(50.0)  # segments 1 (wrong), 2 (right)
    assert m["tail_action_top1"] == pytest.approx(100 / 3)  # segments 1, 2, 3: only 3 right
    assert m["unseen_verb_top1"] == 50.0 and m["unseen_noun_top1"] == 50.0
    assert m["unseen_action_top1"] == 0.0
    assert m["action_top1"] == 50.0
    assert metrics.overfitting_gap(45.0, 30.0) == 15.0


# ---------------------------------------------------------------- training machinery


@pytest.fixture()
def caches(tmp_path):
    return (
        make_cache(tmp_path / "train.h5", n=96, views=2, seed=0),
        make_cache(tmp_path / "val.h5", n=40, seed=1, split="validation"),
    )


def _cfg(caches, **kw) -> hc.TrainConfig:
    return hc.TrainConfig(
        **{
            "head": "lstm",
            "train_features": str(caches[0]),
            "val_features": str(caches[1]),
            "epochs": 4,
            "batch_size": 16,
            "lr": 1e-3,
            "dropout": 0.1,
            "frames": 4,
            **kw,
        }
    )


def _metrics(run_dir):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in runlog.read_metrics(run_dir)]


@pytest.mark.slow
def test_run_directory_contents_and_reproducibility(caches, tmp_path):
    data = tr.load_data(caches[0], caches[1], "cpu")
    a, b = tmp_path / "a", tmp_path / "b"
    tr.run(_cfg(caches), a, data)
    tr.run(_cfg(caches), b, data)
    assert {p.name for p in a.iterdir()} >= {"config.toml", "metrics.jsonl", "best.pt", "last.pt", "curves.png"}
    rows = _metrics(a)
    assert len(rows) == 4 and rows == _metrics(b)
    for key in ("train_loss", "val_loss", "val_verb_top1", "val_noun_top5", "val_action_top5", "gap", "lr"):
        assert key in rows[0]
    # it trained: both losses fell (equal figures - nothing learnt - fail here)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.05 and rows[-1]["val_loss"] < rows[0]["val_loss"]
    ckpt = torch.load(a / "best.pt", weights_only=True)
    assert ckpt["cache"]["backbone"] == "resnet50" and ckpt["cache"]["num_verbs"] == 5
    assert ckpt["norm"]["mean"].shape == (32,)
    cfg = hc.resolve_config(a / "config.toml", {})
    assert cfg == _cfg(caches)


def test_resume_equals_an_uninterrupted_run(caches, tmp_path):
    data = tr.load_data(caches[0], caches[1], "cpu")
    tr.run(_cfg(caches), tmp_path / "full", data)
    tr.run(_cfg(caches, epochs=2), tmp_path / "part", data)
    tr.run(_cfg(caches), tmp_path / "part", data, resume=True)
    assert _metrics(tmp_path / "part") == _metrics(tmp_path / "full")


def test_config_file_flags_and_unknown_keys(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[train]\nlr = 5e-5\nbatch_size = 32\ndropout = 0.6\n")
    cfg = hc.resolve_config(f, {"batch_size": 8, "head": "transformer"})
    assert (cfg.lr, cfg.batch_size, cfg.dropout, cfg.head) == (5e-5, 8, 0.6, "transformer")
    f.write_text("lr = 1e-4\nlabel_smothing = 0.1\n")
    with pytest.raises(EkxError, match=r"unknown key.*label_smothing"):
        hc.resolve_config(f, {})
    f.write_text("lr = 'fast'\n")
    with pytest.raises(EkxError, match=r"'lr' must be float"):
        hc.resolve_config(f, {})


def test_lr_schedule_warms_up_then_restarts():
    cfg = hc.TrainConfig(lr=1.0, warmup_epochs=2, restart_epochs=4, min_lr_ratio=0.0)
    assert ep.lr_at(cfg, 1.0) == pytest.approx(0.5)
    assert ep.lr_at(cfg, 2.0) == pytest.approx(1.0)
    assert ep.lr_at(cfg, 4.0) == pytest.approx(0.5)
    assert ep.lr_at(cfg, 6.0) == pytest.approx(1.0)  # warm restart
    torch_sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), T_0=4, T_mult=2
    )
    cfg2 = hc.TrainConfig(lr=1.0, warmup_epochs=0, restart_epochs=4, restart_mult=2, min_lr_ratio=0.0)
    for t in (0.5, 3.0, 5.0, 11.5, 13.0):
        torch_sched.step(t)
        assert ep.lr_at(cfg2, t) == pytest.approx(torch_sched.get_last_lr()[0], abs=1e-9)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(caches, tmp_path, monkeypatch):
    data = tr.load_data(caches[0], caches[1], "cpu")
    real = ep.loss_fn
    calls = {"n": 0}
    steps_per_epoch = math.ceil(96 / 16)

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] > steps_per_epoch + 2 else loss

    monkeypatch.setattr(ep, "loss_fn", poisoned)
    with pytest.raises(ep.NonFiniteLoss, match=r"loss became nan at epoch 2.*last good checkpoint"):
        tr.run(_cfg(caches), tmp_path / "r", data)
    ckpt = ck.load_checkpoint(tmp_path / "r" / "last.pt")
    assert ckpt["epoch"] == 1 and len(runlog.read_metrics(tmp_path / "r")) == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_incompatible_cache_is_refused(caches, tmp_path):
    data = tr.load_data(caches[0], caches[1], "cpu")
    tr.run(_cfg(caches, epochs=1), tmp_path / "r", data)
    other = make_cache(tmp_path / "other.h5", n=8, k=16, seed=2)
    with pytest.raises(EkxError, match=r"(?s)incompatible.*frames_per_segment: checkpoint 8, cache 16"):
        evaluate_run(tmp_path / "r", other)
    effnet = make_cache(tmp_path / "effnet.h5", n=8, seed=2, backbone="efficientnet_b3")
    result = runner.invoke(app, ["evaluate", str(tmp_path / "r"), "--features", str(effnet)])
    assert result.exit_code == 1 and "backbone: checkpoint 'resnet50', cache 'efficientnet_b3'" in result.output


def test_submission_has_every_score_for_every_segment_and_round_trips(tmp_path):
    train = make_cache(tmp_path / "train.h5", n=40, num_verbs=97, num_nouns=300, seed=0)
    val = make_cache(tmp_path / "val.h5", n=20, num_verbs=97, num_nouns=300, seed=1)
    test = make_cache(tmp_path / "test.h5", n=30, num_verbs=97, num_nouns=300, seed=2, labelled=False, split="test")
    data = tr.load_data(train, val, "cpu")
    cfg = hc.TrainConfig(head="pooling", epochs=1, frames=4, train_features=str(train), val_features=str(val))
    tr.run(cfg, tmp_path / "r", data)
    out = tmp_path / "sub.json"
    result = runner.invoke(app, ["evaluate", str(tmp_path / "r"), "--features", str(test), "--submission", str(out)])
    assert result.exit_code == 0, result.output
    sub = json.loads(out.read_text())
    assert {k: sub[k] for k in ("version", "challenge", "sls_pt", "sls_tl", "sls_td")} == {
        "version": "0.2",
        "challenge": "action_recognition",
        "sls_pt": 2,
        "sls_tl": 3,
        "sls_td": 4,
    }
    assert len(sub["results"]) == 30
    for entry in sub["results"].values():
        assert list(entry["verb"]) == [str(i) for i in range(97)]
        assert list(entry["noun"]) == [str(i) for i in range(300)]
        noun = list(entry["noun"].values())  # raw logits, each a float32 value written exactly
        assert torch.tensor(noun).tolist() == noun and sum(noun) != pytest.approx(1.0, abs=1e-3)
    direct = submission(evaluate_run(tmp_path / "r", test))
    assert json.loads(json.dumps(direct)) == sub
    # labelled split through the CLI: metrics table and --json
    js = tmp_path / "m.json"
    result = runner.invoke(app, ["evaluate", str(tmp_path / "r"), "--json", str(js)])
    assert result.exit_code == 0, result.output
    assert set(json.loads(js.read_text())["metrics"]) >= {"verb_top1", "noun_top5", "action_top1", "action_top5"}


def test_random_weights_of_another_seed_are_refused(tmp_path):
    """--weights none: a seed-1 cache is another network; train-head and evaluate refuse to
    mix it with a seed-0 one."""
    import h5py

    train = make_cache(tmp_path / "train.h5", n=32, seed=0)
    val = make_cache(tmp_path / "val.h5", n=16, seed=1, split="validation")

    def set_seed(path, seed):
        with h5py.File(path, "a") as f:
            f.attrs["seed"] = seed

    set_seed(train, 0)
    set_seed(val, 1)
    with pytest.raises(EkxError, match=r"mean different things \(seed: train cache 0, validation cache 1\)"):
        tr.load_data(train, val, "cpu")
    set_seed(val, 0)
    tr.run(_cfg((train, val), epochs=1), tmp_path / "r", tr.load_data(train, val, "cpu"))
    set_seed(val, 1)
    with pytest.raises(EkxError, match="seed: checkpoint 0, cache 1"):
        evaluate_run(tmp_path / "r", val)


@pytest.mark.parametrize("resume", [False, True])
def test_run_killed_before_its_first_checkpoint_starts_afresh(caches, tmp_path, resume):
    """metrics.jsonl but no last.pt (killed in epoch 1): the same command, with or without
    --resume, starts the run again under its name, saying so."""
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("")
    warnings: list[str] = []
    cfg = _cfg(caches, epochs=1, name="r")
    out, _ = tr.main(cfg, tmp_path, tmp_path / "runs", None, resume, warn=warnings.append)
    assert out == run_dir and (run_dir / "last.pt").is_file() and len(runlog.read_metrics(run_dir)) == 1
    assert len(warnings) == 1 and "no checkpoint" in warnings[0] and "afresh" in warnings[0]


def test_annotations_flag_pointing_nowhere_is_an_error(caches, tmp_path):
    """An explicit --annotations DIR that does not exist: exit 1 naming it (not exit 0 with
    the tail and unseen metrics silently left out), for train-head and evaluate."""
    nowhere = tmp_path / "no-such-annotations"
    feats = ["--train-features", str(caches[0]), "--val-features", str(caches[1])]
    result = runner.invoke(
        app,
        [
            "train-head",
            "pooling",
            *feats,
            "--epochs",
            "1",
            "--runs",
            str(tmp_path / "runs"),
            "--annotations",
            str(nowhere),
        ],
    )
    assert result.exit_code == 1 and f"--annotations {nowhere}: no such directory" in result.output
    tr.run(_cfg(caches, epochs=1), tmp_path / "r", tr.load_data(caches[0], caches[1], "cpu"))
    result = runner.invoke(app, ["evaluate", str(tmp_path / "r"), "--annotations", str(nowhere)])
    assert result.exit_code == 1 and f"--annotations {nowhere}: no such directory" in result.output


def test_unsafe_checkpoint_says_what_it_is_not_and_never_advises_weights_only_false(tmp_path):
    import argparse

    path = tmp_path / "best.pt"
    torch.save({"format": "ekx-head", "x": argparse.Namespace(a=1)}, path)  # a pickled non-tensor object
    for bad in (path, tmp_path / "junk.pt"):
        if bad.name == "junk.pt":
            bad.write_bytes(b"not a torch file")
        with pytest.raises(EkxError) as e:
            ck.load_checkpoint(bad)
        msg = str(e.value)
        assert "not a safe tensor file" in msg and "ekx train-head" in msg and "weights_only" not in msg


@pytest.mark.parametrize("name", sorted(models.REGISTRY))
def test_every_parameter_of_every_head_receives_a_gradient(name):
    """DistributedDataParallel fails on a parameter outside the graph: none may be."""
    torch.manual_seed(0)
    model = models.create(name, dim=16, num_verbs=5, num_nouns=7, frames=8, dropout=0.1, drop_path=0.1)
    out = model(torch.randn(4, 8, 16))
    ep.loss_fn(out, torch.randint(5, (4,)), torch.randint(7, (4,)), 0.1).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{name}: parameters without a gradient: {missing}"
    zero = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    assert not zero, f"{name}: parameters with an all-zero gradient: {zero}"


def test_a_checkpoint_from_before_the_norm_ctx_fix_still_loads():
    from ekx.heads.models.layers import Block

    torch.manual_seed(0)
    block = Block(8, 2, 0.0, 0.0)
    old = {**block.state_dict(), "norm_ctx.weight": torch.ones(8), "norm_ctx.bias": torch.zeros(8)}
    Block(8, 2, 0.0, 0.0).load_state_dict(old)  # strict: nothing unexpected left


@pytest.mark.slow
def test_cli_resume_continues_with_the_runs_configuration_and_refuses_other_values(tmp_path):
    """The README's `ekx train-head lstm --name a --resume --epochs N`: the run's lr, batch size,
    dropout... not the defaults (the resumed metrics equal an uninterrupted run's); config.toml
    keeps them; a different value given with --resume is refused, naming the key."""
    feats = tmp_path / "features" / "resnet50"
    make_cache(feats / "train.h5", n=64, seed=0)
    make_cache(feats / "validation.h5", n=24, seed=1, split="validation")
    where = ["--features", str(tmp_path / "features"), "--runs", str(tmp_path / "runs"), "--device", "cpu"]
    hp = ["--lr", "2e-3", "--batch-size", "8", "--dropout", "0.1", "--frames", "4", "--label-smoothing", "0.2"]

    def cli(*argv):
        result = runner.invoke(app, ["train-head", "lstm", *argv, *where])
        return result

    assert cli(*hp, "--epochs", "3", "--name", "full").exit_code == 0
    assert cli(*hp, "--epochs", "2", "--name", "part").exit_code == 0
    resumed = cli("--name", "part", "--resume", "--epochs", "3")
    assert resumed.exit_code == 0, resumed.output
    assert _metrics(tmp_path / "runs" / "part") == _metrics(tmp_path / "runs" / "full")
    cfg = hc.resolve_config(tmp_path / "runs" / "part" / "config.toml", {})
    assert (cfg.lr, cfg.batch_size, cfg.dropout, cfg.frames, cfg.epochs) == (2e-3, 8, 0.1, 4, 3)
    refused = cli("--name", "part", "--resume", "--epochs", "4", "--lr", "1e-3")
    assert refused.exit_code == 1 and "lr (run: 0.002, given: 0.001)" in refused.output, refused.output
    assert hc.resolve_config(tmp_path / "runs" / "part" / "config.toml", {}).epochs == 3  # untouched
    fewer = cli("--name", "part", "--resume", "--epochs", "2")
    assert fewer.exit_code == 1 and "already trained 3 epochs" in fewer.output, fewer.output


def test_logged_val_loss_is_smoothed_like_the_train_loss_and_lr_is_the_epochs_own(caches, tmp_path):
    data = tr.load_data(caches[0], caches[1], "cpu")
    cfg = _cfg(caches, epochs=2, warmup_epochs=4.0, label_smoothing=0.3)
    tr.run(cfg, tmp_path / "r", data)
    rows = runlog.read_metrics(tmp_path / "r")
    steps = math.ceil(96 / cfg.batch_size)
    for r in rows:  # warm-up: the lr grows every step; the row holds the epoch's last step's lr
        assert r["lr"] == pytest.approx(ep.lr_at(cfg, r["epoch"] - 1 + (steps - 1) / steps))
    model = ck.model_from_checkpoint(torch.load(tmp_path / "r" / "last.pt", weights_only=True))
    verb, noun = tr.predict(model, data.val, data.norm, cfg, torch.device("cpu"), "fp32")
    val = data.val
    smoothed = ep.loss_fn({"verb": verb, "noun": noun}, val.verbs[val.rows], val.nouns[val.rows], 0.3)
    assert rows[-1]["val_loss"] == pytest.approx(float(smoothed), rel=1e-5)


def test_compare_takes_a_directory_holding_a_finetuned_run(tmp_path):
    from ekx.finetune.config import FinetuneConfig

    row = {k: 10.0 for k in ("train_loss", "val_loss", "train_action_top1", "gap", "seconds")}
    row |= {f"val_{t}_top{k}": 20.0 for t in ("verb", "noun", "action") for k in (1, 5)}
    for name, cfg in (("head-a", hc.TrainConfig(head="lstm")), ("ft-a", FinetuneConfig(head="transformer"))):
        (tmp_path / name).mkdir()
        runlog.write_config(tmp_path / name, cfg)
        (tmp_path / name / "metrics.jsonl").write_text(json.dumps({"epoch": 1, **row}) + "\n")
    torch.save({"model": {"w": torch.zeros(3)}, "backbone": {"b": torch.zeros(5)}}, tmp_path / "ft-a" / "best.pt")
    result = runner.invoke(app, ["compare", str(tmp_path)], terminal_width=250)
    assert result.exit_code == 0, result.output
    from ekx.heads import compare as cmp

    rows = {r["run"]: r for r in cmp.collect([tmp_path])}
    assert rows["ft-a"]["head"] == "transformer" and rows["ft-a"]["params"] == 8  # head + backbone
    assert cmp.reproduce_command(rows["ft-a"]).startswith("ekx finetune transformer --config")
    assert cmp.reproduce_command(rows["head-a"]).startswith("ekx train-head lstm --config")


def test_checkpoint_carries_and_restores_the_cuda_rng_state(tmp_path, monkeypatch):
    """On a GPU the CUDA stream (dropout, drop path) is saved and restored too. No GPU here:
    torch.cuda's state functions are stand-ins, the checkpoint round trip is real."""
    cuda_state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": cuda_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    gen = torch.Generator().manual_seed(3)
    ck.save_checkpoint(tmp_path / "c.pt", {"model": model.state_dict()}, opt, hc.TrainConfig(), 1, 0.0, gen)
    ckpt = ck.load_checkpoint(tmp_path / "c.pt")  # weights_only
    assert torch.equal(ckpt["rng"]["cuda"], cuda_state)
    torch.rand(5, generator=gen)
    ck.restore_rng(ckpt["rng"], gen)
    assert len(restored) == 1 and torch.equal(restored[0], cuda_state)
    assert torch.equal(gen.get_state(), ckpt["rng"]["gen"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU checkpoint resumed on a CPU
    ck.restore_rng(ckpt["rng"], gen)
    assert len(restored) == 1
