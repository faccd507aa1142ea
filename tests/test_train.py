"""tinylora.train: the loop learns, resumes bit for bit, stops or skips on NaN, saves whole."""
import json
import os

import numpy as np
import pytest

import tinylora as tl
from tinylora import backend, nn
from tinylora.checkpoint import load_gpt, resolve_checkpoint, save_checkpoint
from tinylora.cli import main as cli
from tinylora.data import load_data
from tinylora.io import load_safetensors
from tinylora.models import GPT, GPTConfig
from tinylora.optim import AdamW
from tinylora.apps.train import train_gpt
from tinylora.train import NonFiniteError, TrainConfig, Trainer

TINY = dict(block_size=16, n_layer=1, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def prose():
    return load_data("builtin:prose", block_size=16)


def make_trainer(prose, out_dir=None, dropout=0.0, **train):
    tl.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=prose.tokenizer.vocab_size, dropout=dropout, **TINY))
    cfg = dict(max_iters=8, batch_size=4, eval_interval=4, eval_iters=2, warmup_iters=2,
               lr=3e-3, log_interval=2, progress=False)
    return Trainer(model, prose, TrainConfig(**{**cfg, **train}), out_dir)


def weights(model):
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def test_a_short_run_lowers_validation_loss(tmp_path):
    model, tok, result = train_gpt(
        "builtin:python", tmp_path / "run", model_args=dict(TINY, n_embd=32),
        train_args=dict(max_iters=60, batch_size=8, eval_interval=30, eval_iters=4,
                        warmup_iters=5, lr=5e-3, progress=False))
    first, last = result.evals[0], result.evals[-1]
    assert first["step"] == 0 and last["step"] == 60
    assert last["val_loss"] < first["val_loss"] - 1.0            # ln(96) = 4.56 -> well below
    events = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    train_lines = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in train_lines] == list(range(10, 61, 10))
    assert {"train_loss", "lr", "tokens_per_s", "grad_norm"} <= set(train_lines[0])
    assert [e["step"] for e in events if e["event"] == "eval"] == [0, 30, 60]
    # the checkpoint loads back into the same model, tokenizer and outputs
    again, tok2, config = load_gpt(tmp_path / "run")
    assert tok2 == tok and config["model"]["config"]["n_embd"] == 32
    for (k, a), b in zip(weights(model).items(), weights(again).values()):
        assert np.array_equal(a, b), k
    files = sorted(os.listdir(resolve_checkpoint(tmp_path / "run")))
    assert files == ["config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"]
    tensors, _ = load_safetensors(os.path.join(resolve_checkpoint(tmp_path / "run"), "model.safetensors"))
    assert "lm_head.weight" not in tensors and "transformer.wte.weight" in tensors


class Interrupted(Exception):
    pass


@pytest.mark.cpu_only("bit-exact resume: the GPU dropout stream is not checkpointed and atomic scatter-adds sum in no fixed order")
def test_resume_continues_bit_for_bit(tmp_path, prose):
    # dropout and gradient accumulation on: both RNG streams and micro-batching must resume
    opts = dict(dropout=0.1, grad_accum_steps=2)
    full = make_trainer(prose, tmp_path / "full", **opts)
    ref = full.train()

    class Crashing(Trainer):
        def _accumulate(self):
            if self.step == 6:          # after the step-4 checkpoint, mid-way to the next
                raise Interrupted
            return super()._accumulate()

    first = make_trainer(prose, tmp_path / "run", **opts)
    first.__class__ = Crashing
    with pytest.raises(Interrupted):
        first.train()
    resumed = make_trainer(prose, tmp_path / "run", **opts)   # a fresh process would rebuild it
    folder = resumed.resume()
    assert folder.endswith("step-0000004") and resumed.step == 4
    out = resumed.train()
    assert sorted(out.losses) == [5, 6, 7, 8]
    for step, loss in out.losses.items():
        assert loss == ref.losses[step], step                 # exactly equal floats
    for (k, a), b in zip(weights(full.model).items(), weights(resumed.model).values()):
        assert np.array_equal(a, b), k
    assert out.val_loss == ref.val_loss
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert steps == sorted(steps) and steps.count(6) == 1     # the lost step 6 is logged once


class NaNAt(nn.Module):
    """A GPT whose loss turns NaN on the k-th training forward."""

    def __init__(self, inner, k):
        super().__init__()
        self.inner, self.k, self.calls = inner, k, 0
        self.config = inner.config

    def forward(self, x, y):
        logits, loss = self.inner(x, y)
        if self.training:
            self.calls += 1
            if self.calls == self.k:
                loss = loss * float("nan")
        return logits, loss


def test_nonfinite_loss_stops_with_the_last_good_checkpoint(tmp_path, prose):
    clean = make_trainer(prose, tmp_path / "clean", eval_interval=0, checkpoint_interval=4)
    clean.train()
    good, _ = load_safetensors(tmp_path / "clean" / "checkpoints" / "step-0000004" / "model.safetensors")
    t = make_trainer(prose, tmp_path / "run", eval_interval=0, checkpoint_interval=4)
    t.model = NaNAt(t.model, k=6)
    with pytest.raises(NonFiniteError, match=r"non-finite loss nan at step 6; .*last good "
                                             r"checkpoint is .*step-0000004") as info:
        t.train()
    assert info.value.step == 6 and info.value.checkpoint.endswith("step-0000004")
    saved, _ = load_safetensors(os.path.join(info.value.checkpoint, "model.safetensors"))
    assert len(saved) == len(good)
    for k, v in good.items():                     # the checkpoint is the clean run's step 4
        if backend.is_cuda():   # atomic scatter-adds (the embedding's backward) sum in no fixed order
            np.testing.assert_allclose(saved["inner." + k], v, rtol=1e-5, atol=1e-6, err_msg=k)
        else:
            assert np.array_equal(saved["inner." + k], v), k
    assert json.load(open(tmp_path / "run" / "latest.json"))["step"] == 4


def test_skip_nonfinite_counts_and_continues(tmp_path, prose):
    t = make_trainer(prose, tmp_path / "run", skip_nonfinite=True)
    t.model = NaNAt(t.model, k=8)                 # the very last step: still evaluated and saved
    result = t.train()
    assert result.skipped == 1 and result.step == 8 and sorted(result.losses) == list(range(1, 8))
    assert all(np.isfinite(p.numpy()).all() for p in t.model.parameters())
    events = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert {"event": "skip", "step": 8, "reason": "loss nan"} in events
    assert result.evals[-1]["step"] == 8 and result.checkpoint.endswith("step-0000008")


def test_prebuilt_model_frozen_params_and_pluggable_saving(tmp_path, prose):
    tl.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, **TINY))
    model.transformer.wte.weight.requires_grad_(False)      # frozen (tied lm_head too)
    frozen = model.transformer.wte.weight.numpy().copy()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW([{"params": trainable[:2], "lr": 4e-2}, {"params": trainable[2:]}], lr=1e-2)
    saved = []

    def save_small(m, folder):
        saved.append(folder)
        with open(os.path.join(folder, "adapter.txt"), "w") as f:
            f.write("only the adapter")

    t = Trainer(model, prose, TrainConfig(max_iters=4, batch_size=2, eval_interval=2, lr=1e-2,
                                          eval_iters=1, progress=False),
                tmp_path / "run", optimizer=opt, save_model=save_small,
                run_config={"lora": {"r": 4}})
    t.train()
    assert np.array_equal(model.transformer.wte.weight.numpy(), frozen)
    assert len(opt.state) == len(trainable)
    assert opt.param_groups[0]["lr"] == pytest.approx(4 * opt.param_groups[1]["lr"])  # scaled
    folder = resolve_checkpoint(tmp_path / "run")
    assert sorted(os.listdir(folder)) == ["adapter.txt", "config.json", "optimizer.safetensors",
                                          "trainer_state.json"]
    assert json.load(open(os.path.join(folder, "config.json")))["lora"] == {"r": 4}


def test_a_failed_checkpoint_write_leaves_the_previous_one(tmp_path, prose):
    t = make_trainer(prose, tmp_path / "run", max_iters=4, eval_interval=0, checkpoint_interval=4)
    t.train()
    before = {f: open(os.path.join(t.checkpoint, f), "rb").read() for f in os.listdir(t.checkpoint)}

    def broken(model, folder):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "run", 8, model=t.model, optimizer=t.optimizer,
                        config={}, trainer_state={}, save_model=broken)
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["step-0000004"]   # no debris
    assert resolve_checkpoint(tmp_path / "run") == t.checkpoint
    assert before == {f: open(os.path.join(t.checkpoint, f), "rb").read() for f in before}


def test_cli_train_and_generate(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["train", "--data", "builtin:prose", "--out", out, "--n-layer", "1", "--n-head", "2",
            "--n-embd", "16", "--block-size", "16", "--batch-size", "4", "--max-iters", "4",
            "--eval-interval", "2", "--no-progress"]
    assert cli(args) == 0
    assert "val loss" in capsys.readouterr().out
    assert cli(["generate", "--checkpoint", out, "--prompt", "The ", "--max-new-tokens", "20",
                "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("The ") and len(text.rstrip("\n")) >= 4
    assert cli(["train", "--out", out, "--resume", "--max-iters", "6", "--no-progress"]) == 0
    assert json.load(open(os.path.join(out, "latest.json")))["step"] == 6
    assert cli(["train", "--data", str(tmp_path / "nope.txt"), "--out", out]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinylora train: error: data file") and "\n" not in err
    assert cli(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"]) == 1
    assert "no checkpoint in" in capsys.readouterr().err


class _Regression(nn.Module):
    """y = x w: forward(x, target) returns (prediction, mean squared error)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 1, bias=False)

    def forward(self, x, target):
        d = self.proj(tl.tensor(x)) - tl.tensor(target)
        return d, (d * d).mean()


class _Rows:
    """A batch source: rows of a fixed regression problem, drawn with its own generator."""

    def __init__(self, as_dict):
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((64, 3)).astype(np.float32)
        self.y = self.x @ np.array([[1.0], [-2.0], [0.5]], dtype=np.float32)
        self.rng, self.as_dict = np.random.default_rng(1), as_dict

    def train_batch(self, batch_size):
        rows = self.rng.integers(0, len(self.x), batch_size)
        return ({"x": self.x[rows], "target": self.y[rows]} if self.as_dict
                else (self.x[rows], self.y[rows]))


@pytest.mark.parametrize("as_dict", [False, True])
def test_a_batch_source_trains_through_the_same_loop(as_dict):
    tl.manual_seed(0)
    model = _Regression()
    seen = []
    cfg = TrainConfig(max_iters=60, batch_size=8, lr=0.1, warmup_iters=0, eval_interval=0,
                      log_interval=10, grad_accum_steps=2, progress=False)
    result = Trainer(model, _Rows(as_dict), cfg, on_step=lambda t: seen.append(t.step)).train()
    assert seen == list(range(1, 61)) and result.step == 60
    assert result.tokens_seen == 60 * 2 * 8 * 3              # the first input's size, per batch
    assert result.losses[60] < 0.05 * result.losses[1]
    with pytest.raises(ValueError, match="eval_interval=0"):
        Trainer(model, _Rows(as_dict), TrainConfig(eval_interval=5))


@pytest.mark.parametrize("lr", [0.0, -1.0, float("inf"), float("nan")])
def test_train_config_refuses_a_learning_rate_that_is_not_finite_and_positive(lr):
    with pytest.raises(ValueError, match="lr must be > 0 and finite"):
        TrainConfig(lr=lr)
