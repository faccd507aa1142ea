"""One base model, several adapters, one batch: each row served by its own adapter.

    python examples/05_serve_many_adapters.py            # about a minute on 2 CPU cores
    python examples/05_serve_many_adapters.py --quick    # a few seconds

Two LoRA adapters are trained on one base: "python" (Python source) and "shout" (the same
English, upper-cased). A server keeps one copy of the base and the small adapters, and a
single forward pass takes rows for different adapters (and rows for the plain base):
``model(idx, adapter_names=["python", "shout", "__base__", ...])``. The result equals running
each row alone with its adapter, which this script checks.
"""
import argparse
import os
import tempfile

import numpy as np

from threadpoolctl import threadpool_limits

import tinylora as tl
from tinylora import lora, nn
from tinylora.data import builtin_text, load_data
from tinylora.apps.finetune import finetune, load_base, prepare, save_finetuned
from tinylora.models import GPT, GPTConfig
from tinylora.train import TrainConfig, Trainer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model and a few steps")
    ap.add_argument("--out", default=None, help="output folder (default: a temporary folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS threads (0: the library's default); these matrices are small, and "
                         "on a 2-core machine one thread is faster than two fighting for it")
    args = ap.parse_args(argv)
    # without --out, a temporary folder that is removed when the example ends
    with threadpool_limits(limits=args.threads or None, user_api="blas"), \
            tempfile.TemporaryDirectory(prefix="tinylora-serve-") as tmp:
        return run(args, args.out or tmp)


def run(args, out):
    size = (dict(n_layer=1, n_head=2, n_embd=32, block_size=32) if args.quick else
            dict(n_layer=4, n_head=4, n_embd=128, block_size=64))
    pre_steps, ft_steps = (30, 20) if args.quick else (300, 120)
    T = size["block_size"]

    # a base model pretrained on English prose
    prose = load_data("builtin:prose", block_size=T)
    tl.manual_seed(args.seed)
    base = GPT(GPTConfig(vocab_size=prose.tokenizer.vocab_size, **size))
    base_dir = os.path.join(out, "base")
    Trainer(base, prose, TrainConfig(max_iters=pre_steps, lr=2e-3, warmup_iters=10,
                                     eval_interval=pre_steps, eval_iters=4, seed=args.seed,
                                     progress=not args.quick), base_dir).train()

    # two adapters: Python source, and upper-cased English (a text file of our own)
    shout_file = os.path.join(out, "shout.txt")
    with open(shout_file, "w", encoding="utf-8") as f:
        f.write(builtin_text("prose").upper())
    adapters = {}
    for name, data_spec in (("python", "builtin:python"), ("shout", shout_file)):
        model, tok, _ = load_base(base_dir)
        data = load_data(data_spec, tokenizer=tok, block_size=T)
        prepare(model, "lora", lora.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        res = finetune(model, data, TrainConfig(max_iters=ft_steps, lr=8e-3, weight_decay=0.0,
                                                warmup_iters=ft_steps // 10, eval_interval=ft_steps,
                                                eval_iters=5, seed=args.seed + 1,
                                                progress=not args.quick))
        adapters[name] = os.path.join(out, name)
        save_finetuned(model, tok, "lora", adapters[name], base=base_dir)
        print(f"adapter {name!r}: validation loss {res['val_before']:.3f} -> {res['val_after']:.3f}")

    # the server: one base, both adapters loaded under their names
    server, tok, _ = load_base(base_dir)
    for name, folder in adapters.items():
        lora.load_adapter(server, folder, adapter_name=name)
    base_mib = sum(p.data.nbytes for p in server.parameters() if not p.requires_grad) / 2**20
    sizes = ", ".join(f"{n} {os.path.getsize(os.path.join(f, 'adapter_model.safetensors')) / 2**10:.0f} KiB"
                      for n, f in adapters.items())
    print(f"server: one base ({base_mib:.2f} MiB of weights) + adapters ({sizes})")

    # one mixed batch: every row names its adapter (nn.BASE = "__base__" for none)
    names = ["python", "shout", nn.BASE, "python"]
    rng = np.random.default_rng(args.seed)
    idx = rng.integers(0, tok.vocab_size, (len(names), T))
    server.eval()
    with tl.no_grad():
        mixed = server(idx, adapter_names=names)[0].numpy()
        worst = 0.0
        for i, name in enumerate(names):       # the same rows, one at a time
            if name == nn.BASE:
                with lora.disable_adapter(server):
                    alone = server(idx[i:i + 1])[0].numpy()
            else:
                lora.set_adapter(server, name)
                alone = server(idx[i:i + 1])[0].numpy()
            worst = max(worst, float(np.abs(mixed[i] - alone[0]).max()))
    print(f"mixed batch {names}: largest difference from one-row-at-a-time runs {worst:.1e}")
    assert worst < 1e-4

    # generation, each row with its own adapter, from the same prompt and seed
    prompt = np.tile(tok.encode("The ")[None], (3, 1))
    rows = ["python", "shout", nn.BASE]
    text = server.generate(prompt, 60, temperature=0.8, adapter_names=rows,
                           rng=np.random.default_rng(args.seed))
    for name, row in zip(rows, text):
        print(f"  {name:>8}: {tok.decode(row)!r}")
    return worst


if __name__ == "__main__":
    main()
