"""Train a small character-level GPT on English prose, sample from it, save and reload it.

    python examples/02_train_tiny_gpt.py            # about a minute on 2 CPU cores
    python examples/02_train_tiny_gpt.py --quick    # a few seconds

The corpus is built in (the Python Language Reference's help pages, ~300 KB of English),
so nothing is downloaded. The Trainer draws random windows, evaluates on held-out text,
clips gradients, warms up and decays the learning rate, and writes checkpoints that resume
exactly (safetensors + JSON, never pickles).
"""
import argparse
import os
import tempfile

from threadpoolctl import threadpool_limits

import tinylora as tl
from tinylora.checkpoint import load_gpt
from tinylora.data import load_data
from tinylora.models import GPT, GPTConfig
from tinylora.train import TrainConfig, Trainer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model and a few steps")
    ap.add_argument("--out", default=None, help="run folder (default: a temporary folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS threads (0: the library's default); these matrices are small, and "
                         "on a 2-core machine one thread is faster than two fighting for it")
    args = ap.parse_args(argv)
    # without --out, a temporary folder that is removed when the example ends
    with threadpool_limits(limits=args.threads or None, user_api="blas"), \
            tempfile.TemporaryDirectory(prefix="tinylora-gpt-") as tmp:
        return run(args, args.out or tmp)


def run(args, out):
    size = (dict(n_layer=1, n_head=2, n_embd=32, block_size=32) if args.quick else
            dict(n_layer=4, n_head=4, n_embd=128, block_size=64))
    steps = 40 if args.quick else 500
    data = load_data("builtin:prose", block_size=size["block_size"])
    print(f"data: {data.source}, {len(data.train):,} training and {len(data.val):,} validation "
          f"characters, vocabulary of {data.tokenizer.vocab_size}")

    tl.manual_seed(args.seed)
    model = GPT(GPTConfig(vocab_size=data.tokenizer.vocab_size, **size))
    print(f"model: {model.num_parameters():,} parameters ({size})")

    config = TrainConfig(max_iters=steps, batch_size=12, lr=2e-3, warmup_iters=steps // 20,
                         eval_interval=steps // 4, eval_iters=5 if args.quick else 10,
                         seed=args.seed, progress=not args.quick)
    result = Trainer(model, data, config, out).train()
    first, last = result.evals[0], result.evals[-1]
    print(f"validation loss {first['val_loss']:.3f} (step 0) -> {last['val_loss']:.3f} "
          f"(step {last['step']}), {result.elapsed_s:.1f} s")

    prompt = data.tokenizer.encode("The ")[None]
    sample = model.generate(prompt, 120, temperature=0.8, rng=tl.backend.np.random.default_rng(0))
    print("sample:", repr(data.tokenizer.decode(sample[0])))

    # the checkpoint folder has everything needed to rebuild the model
    again, tok, _ = load_gpt(out)
    same = again.generate(prompt, 120, temperature=0.8, rng=tl.backend.np.random.default_rng(0))
    assert (same == sample).all(), "the reloaded model generates differently"
    print(f"checkpoint {result.checkpoint} reloads to the same model; files: "
          f"{sorted(os.listdir(result.checkpoint))}")
    return result


if __name__ == "__main__":
    main()
