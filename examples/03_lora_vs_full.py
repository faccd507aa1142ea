"""LoRA against full fine-tuning: pretrain on English, adapt to Python, compare.

    python examples/03_lora_vs_full.py            # about a minute and a half on 2 CPU cores
    python examples/03_lora_vs_full.py --quick    # a few seconds

Both start from the same pretrained weights and see the same batches. LoRA trains two thin
matrices per adapted layer (a few percent of the weights) and saves only those; full
fine-tuning trains and saves everything. `tinylora demo` runs the same comparison at a
larger size, with QLoRA as a third method.
"""
import argparse
import os
import tempfile

from threadpoolctl import threadpool_limits

import tinylora as tl
from tinylora import lora
from tinylora.data import load_data
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
            tempfile.TemporaryDirectory(prefix="tinylora-lora-vs-full-") as tmp:
        return run(args, args.out or tmp)


def run(args, out):
    size = (dict(n_layer=1, n_head=2, n_embd=32, block_size=32) if args.quick else
            dict(n_layer=4, n_head=4, n_embd=128, block_size=64))
    pre_steps, ft_steps = (40, 20) if args.quick else (400, 150)
    evals = dict(eval_interval=ft_steps // 2, eval_iters=4 if args.quick else 10)

    # 1. pretrain on the base domain (English prose); the run folder is the base checkpoint
    prose = load_data("builtin:prose", block_size=size["block_size"])
    tl.manual_seed(args.seed)
    base_model = GPT(GPTConfig(vocab_size=prose.tokenizer.vocab_size, **size))
    base_dir = os.path.join(out, "base")
    Trainer(base_model, prose, TrainConfig(max_iters=pre_steps, lr=2e-3, warmup_iters=10,
                                           seed=args.seed, progress=not args.quick, **evals),
            base_dir).train()

    # 2. fine-tune two copies of it on the target domain (Python source)
    rows = []
    for method, lr in (("lora", 8e-3), ("full", 2e-3)):
        model, tok, _ = load_base(base_dir)
        python = load_data("builtin:python", tokenizer=tok, block_size=size["block_size"])
        cfg = lora.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
        info = prepare(model, method, cfg)            # LoRA: freeze the base, add A and B
        res = finetune(model, python, TrainConfig(max_iters=ft_steps, lr=lr, weight_decay=0.0,
                                                  warmup_iters=ft_steps // 10, seed=args.seed + 1,
                                                  progress=not args.quick, **evals))
        path = save_finetuned(model, tok, method, os.path.join(out, method), base=base_dir)
        rows.append((method, info, res, os.path.getsize(path)))

    # 3. the comparison
    print(f"\n{'method':8}{'trainable':>12}{'%':>8}  {'val loss on Python':>22}{'ms/step':>9}"
          f"{'saved':>12}")
    for method, info, res, size_b in rows:
        print(f"{method:8}{info['trainable']:>12,}{info['trainable_pct']:>8.2f}  "
              f"{res['val_before']:>10.3f} -> {res['val_after']:<8.3f}{res['ms_per_step']:>9.0f}"
              f"{size_b / 2**10:>9.0f} KiB")
    (_, _, l_res, l_size), (_, _, f_res, f_size) = rows
    print(f"\nLoRA reaches {l_res['val_after']:.3f} against full fine-tuning's "
          f"{f_res['val_after']:.3f}, from {l_res['val_before']:.3f}; its file is "
          f"{f_size / l_size:.0f}x smaller. "
          + (f"Files in {out}" if args.out else "(--out DIR keeps the files)"))
    return rows


if __name__ == "__main__":
    main()
