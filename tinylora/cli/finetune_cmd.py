"""`tinylora finetune`: fine-tune a GPT checkpoint with LoRA, QLoRA or in full."""
from __future__ import annotations

import os

from .common import add_command, add_json, add_out, lora_config, print_json

_DEFAULT_LR = {"full": 1e-3, "lora": 3e-3, "qlora": 3e-3}


def register(sub, name, summary):
    p = add_command(sub, name, summary,
                    "Fine-tune a GPT, or a Llama-family model from a Hugging Face folder "
                    "(Llama, SmolLM2, TinyLlama, Qwen2: config.json's model_type llama or "
                    "qwen2), on text or, for a Llama, instruction records. LoRA (the default) "
                    "trains low-rank adapters on a frozen base and saves them in PEFT's layout "
                    "(adapter_model.safetensors + adapter_config.json); --qlora first stores the "
                    "frozen Linear weights in 4-bit NF4; --full trains every weight and saves a "
                    "whole checkpoint (a Hugging Face folder for a Llama-family base). Use the "
                    "result with `tinylora generate --adapter OUT` (or --checkpoint OUT for "
                    "--full; --pretrained OUT for a Llama's), or `tinylora merge`. A Llama-family "
                    "model trains with gradient checkpointing (each layer recomputed in the "
                    "backward).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--base", help="base model: a tinylora checkpoint folder or run folder")
    src.add_argument("--pretrained",
                     help="base model: a Hugging Face GPT-2 folder (config.json, model.safetensors, "
                          "vocab.json, merges.txt), or a Llama-family one (model_type llama or "
                          "qwen2: config.json, model.safetensors or its shards, tokenizer.json)")
    p.add_argument("--data", required=True,
                   help="builtin:python, builtin:prose or a UTF-8 text file (a character-level "
                        "base needs text in its vocabulary); for a Llama-family model also a "
                        ".jsonl file of instruction records (prompt/response or messages; the "
                        "loss is on the responses only)")
    add_out(p, "runs/finetune", "where the adapter (or, with --full, the checkpoint) is written")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--qlora", action="store_true", help="QLoRA: 4-bit NF4 base + LoRA adapters")
    how.add_argument("--full", action="store_true", help="train every weight (no adapters)")
    p.add_argument("--lora-r", type=int, default=8, help="adapter rank r")
    p.add_argument("--lora-alpha", type=float, default=16, help="scale numerator: ΔW = (alpha/r)·B·A")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapter input")
    p.add_argument("--target-modules", default=None,
                   help="comma-separated layer names (e.g. c_attn,c_proj or q_proj,v_proj) or "
                        "all-linear (default: all-linear; q_proj,v_proj for a Llama-family "
                        "model, as PEFT picks)")
    p.add_argument("--max-iters", type=int, default=300, help="optimizer steps")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 1e-3 with --full, else 3e-3; for a "
                        "Llama-family model 2e-5 with --full, else 2e-4)")
    p.add_argument("--block-size", type=int, default=None,
                   help="Llama-family models: tokens per training window, and the longest "
                        "instruction record (default: 256, at most max_position_embeddings; a "
                        "GPT uses its own block_size)")
    p.add_argument("--batch-size", type=int, default=12, help="sequences per step")
    p.add_argument("--eval-interval", type=int, default=50, help="steps between evaluations")
    p.add_argument("--eval-iters", type=int, default=10, help="batches per evaluation")
    p.add_argument("--seed", type=int, default=0, help="random seed (adapter init, data order, dropout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import backend
    from ..data import load_data
    from ..apps.finetune import finetune, load_base, load_pretrained, prepare, save_finetuned
    from ..apps.llama import is_llama_folder
    from ..models.llama import Llama
    from ..train import TrainConfig

    method = "full" if args.full else "qlora" if args.qlora else "lora"
    if args.pretrained and is_llama_folder(args.pretrained):
        from .llama import finetune_llama
        return finetune_llama(args, method)
    if args.pretrained:
        model, tok, base = load_pretrained(args.pretrained)
    else:
        model, tok, base = load_base(args.base)
    if isinstance(model, Llama):   # a toy Llama run (`tinylora train --arch llama`)
        from .llama import finetune_llama
        return finetune_llama(args, method, loaded=(model, tok, base))
    if args.block_size is not None:
        raise ValueError("--block-size is for Llama-family models; a GPT trains on its own "
                         "block_size")
    data = load_data(args.data, tokenizer=tok, block_size=model.config.block_size)
    backend.manual_seed(args.seed)          # the adapters' initial values
    cfg = None if method == "full" else lora_config(args, "all-linear")
    info = prepare(model, method, cfg)
    train = TrainConfig(max_iters=args.max_iters, batch_size=args.batch_size,
                        lr=args.lr or _DEFAULT_LR[method], warmup_iters=max(1, args.max_iters // 10),
                        weight_decay=0.0, eval_interval=args.eval_interval,
                        eval_iters=args.eval_iters, seed=args.seed,
                        progress=not (args.no_progress or args.json))
    res = finetune(model, data, train)
    weights = save_finetuned(model, tok, method, args.out, base=args.base or args.pretrained,
                             extra={"data": args.data, "steps": res["steps"],
                                    "val_loss": res["val_after"], "lr": train.lr, "seed": args.seed})
    summary = {"method": method, "base": base, "data": args.data, "trainable": info["trainable"],
               "total": info["total"], "trainable_pct": round(info["trainable_pct"], 4),
               "val_before": res["val_before"], "val_after": res["val_after"],
               "steps": res["steps"], "ms_per_step": res["ms_per_step"],
               "saved": os.path.abspath(args.out), "saved_bytes": os.path.getsize(weights)}
    if args.json:
        print_json(summary)
        return 0
    print(f"{method}: {info['trainable']:,} trainable of {info['total']:,} parameters "
          f"({info['trainable_pct']:.2f}%), {res['steps']} steps, {res['ms_per_step']:.0f} ms/step")
    if res["val_before"] is not None:
        print(f"validation loss on {args.data}: {res['val_before']:.4f} -> {res['val_after']:.4f}")
    print(f"saved {weights} ({summary['saved_bytes'] / 2**20:.2f} MiB)")
    use = "--checkpoint" if method == "full" else "--adapter"
    print(f"try: tinylora generate {use} {args.out} --prompt 'def '")
    return 0
