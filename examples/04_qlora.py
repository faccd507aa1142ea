"""QLoRA: keep the frozen weights in 4-bit NormalFloat (NF4), train LoRA adapters on top.

    python examples/04_qlora.py            # about a minute on 2 CPU cores
    python examples/04_qlora.py --quick    # a few seconds

1. What 4 bits cost: bits per weight of NF4 with double-quantized scales (4.127), the
   round-trip error on a weight matrix, and the validation loss of the 4-bit model.
2. LoRA on the 4-bit base: only A and B receive gradients; the 4-bit codes never change.
3. The adapter file, loaded onto a freshly quantized base, gives the same logits
   (quantization is deterministic, so the base fingerprint matches).
"""
import argparse
import os
import tempfile

import numpy as np

from threadpoolctl import threadpool_limits

import tinylora as tl
from tinylora import lora, quant
from tinylora.data import load_data
from tinylora.apps.finetune import finetune, load_base, load_finetuned, prepare, save_finetuned
from tinylora.models import GPT, GPTConfig
from tinylora.train import TrainConfig, Trainer, estimate_loss


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
            tempfile.TemporaryDirectory(prefix="tinylora-qlora-") as tmp:
        return run(args, args.out or tmp)


def run(args, out):
    size = (dict(n_layer=1, n_head=2, n_embd=64, block_size=32) if args.quick else
            dict(n_layer=4, n_head=4, n_embd=128, block_size=64))
    pre_steps, ft_steps = (30, 20) if args.quick else (300, 150)

    # 1a. the arithmetic, on one 4096x4096 weight's worth of blocks: 4-bit codes, one 8-bit
    #     scale per 64 weights, one float32 scale (and offset) per 256 of those
    rows = 64 if args.quick else 1024
    W = np.random.default_rng(0).standard_normal((rows, 4096)).astype(np.float32) * 0.02
    packed, state = quant.quantize_4bit(W)
    bits = 8 * (packed.nbytes + state.nbytes) / W.size
    back = tl.backend.to_numpy(quant.dequantize_4bit(packed, state))
    err = np.abs(back - W).mean() / np.abs(W).mean()
    print(f"1. NF4 + double quantization of a {rows}x4096 matrix: {bits:.3f} bits per weight "
          f"(4 + 8/64 + 32/(64*256) = 4.127 plus a little state; float32: 32, bf16: 16); "
          f"a 4096x4096 layer: {4096 * 4096 * bits / 8 / 2**20:.1f} MiB instead of "
          f"{4096 * 4096 * 4 / 2**20:.0f} MiB; mean round-trip error {100 * err:.1f}% of |w|")

    # 1b. a small pretrained model, and the same model with its Linear layers in 4 bits
    prose = load_data("builtin:prose", block_size=size["block_size"])
    tl.manual_seed(args.seed)
    model = GPT(GPTConfig(vocab_size=prose.tokenizer.vocab_size, **size))
    base_dir = os.path.join(out, "base")
    Trainer(model, prose, TrainConfig(max_iters=pre_steps, lr=2e-3, warmup_iters=10,
                                      eval_interval=pre_steps, eval_iters=4, seed=args.seed,
                                      progress=not args.quick), base_dir).train()
    splits = {"val": prose.val}
    before = estimate_loss(model, splits, 12, size["block_size"], 10)["val"]
    report = quant.quantize_model(model, print_fn=None)
    after = estimate_loss(model, splits, 12, size["block_size"], 10)["val"]
    print(f"   {report}")
    print(f"   validation loss on prose: float {before:.4f}, 4-bit {after:.4f}")

    # 2. QLoRA: quantize + inject, then train on Python source
    model, tok, _ = load_base(base_dir)
    info = prepare(model, "qlora", lora.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    codes = {p: m.weight.data.copy() for p, m in model.named_modules()
             if isinstance(m, quant.Linear4bit)}
    python = load_data("builtin:python", tokenizer=tok, block_size=size["block_size"])
    res = finetune(model, python, TrainConfig(max_iters=ft_steps, lr=8e-3, weight_decay=0.0,
                                              warmup_iters=ft_steps // 10, eval_interval=ft_steps,
                                              eval_iters=10, seed=args.seed + 1,
                                              progress=not args.quick))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained)
    assert all(np.array_equal(c, model.get_submodule(p).weight.data) for p, c in codes.items())
    print(f"2. QLoRA trained {info['trainable']:,} of {info['total']:,} weights "
          f"({info['trainable_pct']:.1f}%, all named lora_A / lora_B; the 4-bit codes are unchanged): "
          f"validation loss on Python {res['val_before']:.3f} -> {res['val_after']:.3f}, "
          f"{res['ms_per_step']:.0f} ms/step")

    # 3. save the adapter; load it onto a freshly quantized copy of the base
    path = save_finetuned(model, tok, "qlora", os.path.join(out, "qlora-adapter"), base=base_dir)
    again, _, meta = load_finetuned(os.path.join(out, "qlora-adapter"))
    x = python.val[: size["block_size"]][None].astype(np.int64)
    model.eval()
    with tl.no_grad():
        same = np.allclose(model(x)[0].numpy(), again(x)[0].numpy(), atol=1e-5)
    print(f"3. adapter {path} ({os.path.getsize(path) / 2**10:.0f} KiB) reloaded onto a "
          f"re-quantized base ({meta['quantize']['quant_type']}): same logits: {same}")
    assert same
    return res


if __name__ == "__main__":
    main()
