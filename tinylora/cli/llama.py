"""The Llama-family side of `tinylora finetune`: a Hugging Face Llama/Qwen2 folder with its
tokenizer.json, text or instruction data, LoRA / QLoRA adapters in PEFT's layout (or, with
--full, a Hugging Face folder). `finetune_cmd.run` hands over here when --pretrained names
such a folder; generate and merge find Llama bases through ``apps.finetune.load_base``."""
from __future__ import annotations

import os

from .common import lora_config, print_json

_DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}
DEFAULT_TARGETS = "q_proj,v_proj"     # what PEFT picks for llama and qwen2
DEFAULT_BLOCK = 256


def block_size(args, model) -> int:
    n = model.config.max_position_embeddings
    block = args.block_size if args.block_size is not None else min(DEFAULT_BLOCK, n)
    if not 1 <= block <= n:
        raise ValueError(f"--block-size must be between 1 and the model's "
                         f"max_position_embeddings={n}, got {block}")
    return block


def finetune_llama(args, method: str, loaded=None) -> int:
    """--pretrained names a Llama-family folder, or ``loaded`` is the (model, tokenizer,
    checkpoint) of a toy Llama run (--base)."""
    from .. import backend
    from ..apps.finetune import finetune, finetune_instructions, prepare, save_finetuned
    from ..apps.llama import (load_llama_data, load_llama_pretrained, need_tokenizer,
                              save_llama_folder)
    from ..lora.protocol import is_quantized
    from ..train import TrainConfig

    model, tok, base = loaded or load_llama_pretrained(args.pretrained)
    hf = loaded is None
    need_tokenizer(tok, base)
    block = block_size(args, model)
    data = load_llama_data(args.data, tok, block)
    backend.manual_seed(args.seed)          # the adapters' initial values
    cfg = None if method == "full" else lora_config(args, DEFAULT_TARGETS)
    # a folder saved 4-bit by bitsandbytes loads 4-bit: LoRA on it is QLoRA as it stands
    # (nothing to quantize; loading the adapter later finds the base 4-bit again)
    prequantized = any(is_quantized(m) for _, m in model.named_modules())
    if prequantized and method == "full":
        raise ValueError(f"{base} holds 4-bit weights (bitsandbytes); --full needs a float "
                         "checkpoint; leave out --full to train LoRA adapters on it (QLoRA)")
    saved_as = "lora" if prequantized else method
    info = prepare(model, saved_as, cfg)
    method = "qlora" if prequantized else method
    # keep each layer's input only and recompute the layer in the backward: for SmolLM2-135M
    # at 4 x 256 tokens the peak fell from 3.5 to 1.3 GB at about the same step time
    model.gradient_checkpointing_enable()
    train = TrainConfig(max_iters=args.max_iters, batch_size=args.batch_size, block_size=block,
                        lr=args.lr or _DEFAULT_LR[method], warmup_iters=max(1, args.max_iters // 10),
                        weight_decay=0.0, eval_interval=args.eval_interval,
                        eval_iters=args.eval_iters, seed=args.seed,
                        progress=not (args.no_progress or args.json))
    instruct = hasattr(data, "train_batch")
    res = finetune_instructions(model, data, train) if instruct else finetune(model, data, train)
    extra = {"data": args.data, "steps": res["steps"], "val_loss": res["val_after"],
             "lr": train.lr, "seed": args.seed, "block_size": block}
    if method == "full" and not hf:   # a toy Llama stays a tinylora checkpoint
        weights = save_finetuned(model, tok, method, args.out, base=base, extra=extra)
    elif method == "full":
        save_llama_folder(model, args.out, tokenizer_from=base)
        weights = os.path.join(args.out, "model.safetensors")
    else:
        weights = save_finetuned(model, tok, saved_as, args.out, base=base,
                                 extra={**extra, "base_4bit": prequantized})
    summary = {"method": method, "base": base, "model_type": model.config.model_type,
               "data": args.data, "trainable": info["trainable"], "total": info["total"],
               "trainable_pct": round(info["trainable_pct"], 4),
               "target_modules": None if cfg is None else cfg.target_modules,
               "val_before": res["val_before"], "val_after": res["val_after"],
               "steps": res["steps"], "ms_per_step": res["ms_per_step"],
               "state_bytes": res["state_bytes"],
               "saved": os.path.abspath(args.out), "saved_bytes": os.path.getsize(weights)}
    if args.json:
        print_json(summary)
        return 0
    print(f"{method} on {base} ({model.config.model_type}): {info['trainable']:,} trainable of "
          f"{info['total']:,} parameters ({info['trainable_pct']:.2f}%), {res['steps']} steps, "
          f"{res['ms_per_step']:.0f} ms/step")
    if res["val_before"] is not None:
        on = res.get("val_on", "validation split")
        print(f"loss on {args.data} ({on}): {res['val_before']:.4f} -> {res['val_after']:.4f}")
    print(f"saved {weights} ({summary['saved_bytes'] / 2**20:.2f} MiB)")
    if method == "full":
        where = "--pretrained" if hf else "--checkpoint"
        print(f"try: tinylora generate {where} {args.out} --prompt 'Hello'")
    else:
        print(f"try: tinylora generate --adapter {args.out} --prompt 'Hello'")
    return 0
