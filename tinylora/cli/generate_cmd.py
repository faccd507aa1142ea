"""Continue a prompt with a GPT checkpoint (a run folder or one checkpoint folder), decoding with
a KV cache. Temperature 0 is greedy. With --adapter, the LoRA adapter is loaded onto the base
(--checkpoint, or the base the adapter names); a QLoRA adapter gets its base quantized to 4
bits first. --pretrained takes a Hugging Face folder instead: GPT-2, or Llama-family
(model_type llama or qwen2, with tokenizer.json; generation stops at its eos_token_id).
"""
from __future__ import annotations

import os

from .common import add_command, add_seed


def register(sub, name, summary):
    p = add_command(sub, name, summary, __doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None,
                     help="run folder (uses latest.json) or checkpoint folder; with --adapter, "
                          "its base")
    src.add_argument("--pretrained", default=None, metavar="DIR",
                     help="a Hugging Face model folder (GPT-2 or Llama-family); with --adapter, "
                          "its base")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder (PEFT layout) to apply")
    p.add_argument("--no-check-base", dest="check_base", action="store_false",
                   help="apply the adapter even if it was saved from a different base model")
    p.add_argument("--prompt", default="\n", help="text to continue (characters of the model's vocabulary)")
    p.add_argument("--max-new-tokens", type=int, default=300,
                   help="tokens to generate (characters for a character-level model)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1] (default: off)")
    p.add_argument("--num-samples", type=int, default=1, help="independent continuations")
    add_seed(p)
    p.set_defaults(func=run, setting_flags={"base": "--checkpoint"})   # the adapter's base


def run(args) -> int:
    from .. import backend
    from ..backend import np
    from ..checkpoint import load_gpt

    if not args.prompt:
        raise ValueError("--prompt is empty; give at least one character")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    from ..apps.finetune import load_base, load_finetuned
    from ..apps.llama import (checkpoint_model_type, eos_token_ids, load_llama_checkpoint,
                              need_tokenizer)
    from ..models.llama import Llama

    base = args.checkpoint or args.pretrained
    if args.adapter:
        model, tok, info = load_finetuned(args.adapter, base, check_base=args.check_base)
        folder = info["base"]
    elif args.pretrained:
        model, tok, folder = load_base(args.pretrained)
    elif args.checkpoint:
        if checkpoint_model_type(args.checkpoint) == "Llama":   # `tinylora train --arch llama`
            model, tok, _ = load_llama_checkpoint(args.checkpoint)
        else:
            model, tok, _ = load_gpt(args.checkpoint)
        folder = None
    else:
        raise ValueError("give --checkpoint (a checkpoint or run folder), --pretrained (a "
                         "Hugging Face folder), or --adapter")
    need_tokenizer(tok, folder)
    backend.manual_seed(args.seed)
    ids = np.asarray(tok.encode(args.prompt), dtype=np.int64)
    ids = np.tile(ids[None], (args.num_samples, 1))
    kwargs = {}
    if isinstance(model, Llama) and folder is not None and os.path.isdir(folder):
        kwargs["eos_token_id"] = eos_token_ids(folder)
    out = model.generate(ids, args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, **kwargs)
    for i, row in enumerate(out):
        if i:
            print("\n" + "-" * 40)
        print(tok.decode(row))
    return 0
