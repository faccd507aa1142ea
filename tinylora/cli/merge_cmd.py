"""Load the base checkpoint and the adapter, add (alpha/r)·B·A into each adapted weight and save a
plain GPT checkpoint (model.safetensors + config.json) that `tinylora generate --checkpoint`
loads, with no extra cost per token. An adapter trained with QLoRA is merged into the
dequantized 4-bit base it was trained on. Checks that the merged model's logits equal the
adapted model's. With --hf-out it also writes a Hugging Face GPT-2 folder that transformers'
GPT2LMHeadModel.from_pretrained (and `tinylora finetune --pretrained`) loads. An adapter on a
Llama-family base (a Hugging Face llama or qwen2 folder) is merged into a Hugging Face folder
(config.json, model.safetensors and the base's tokenizer files) that transformers'
AutoModelForCausalLM and `tinylora generate --pretrained` load.
"""
from __future__ import annotations

import os

from .common import add_command, add_json, print_json


def register(sub, name, summary):
    p = add_command(sub, name, summary, __doc__)
    p.add_argument("--adapter", required=True, help="adapter folder (PEFT layout)")
    p.add_argument("--base", default=None,
                   help="base checkpoint (default: the one the adapter names in "
                        "adapter_config.json's base_model_name_or_path)")
    p.add_argument("--no-check-base", dest="check_base", action="store_false",
                   help="merge even if the adapter was saved from a different base model")
    p.add_argument("--out", default=None,
                   help="merged checkpoint folder, a Hugging Face folder for a Llama-family "
                        "base (default: ADAPTER-merged)")
    p.add_argument("--hf-out", default=None, metavar="DIR",
                   help="also write the merged model as a Hugging Face GPT-2 folder (config.json, "
                        "model.safetensors; vocab.json and merges.txt for a GPT-2 BPE tokenizer; "
                        "default: none)")
    add_json(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import lora
    from ..backend import np, to_numpy
    from ..checkpoint import save_gpt
    from ..apps.finetune import load_finetuned
    from ..apps.llama import is_llama_folder, save_llama_folder
    from ..models.llama import Llama
    from ..tensor import no_grad

    out = args.out or os.path.normpath(args.adapter) + "-merged"
    model, tok, info = load_finetuned(args.adapter, args.base, check_base=args.check_base)
    # a fixed probe batch: the merged model must give the adapted model's logits
    cfg = model.config
    llama = isinstance(model, Llama)
    T = min(cfg.max_position_embeddings if llama else cfg.block_size, 16)
    probe = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, T))
    model.eval()
    with no_grad():
        before = to_numpy(model(probe)[0].data)
        lora.merge_and_unload(model, dequantize=True)
        after = to_numpy(model(probe)[0].data)
    diff = float(np.abs(before - after).max())
    scale = float(np.abs(before).max()) or 1.0
    if diff > 1e-4 * scale:
        raise RuntimeError(f"merging changed the logits by {diff:.3g} (max |logit| {scale:.3g}); "
                           "nothing was saved")
    if llama and is_llama_folder(info["base"]):
        return _save_llama(args, model, info, out, diff)
    path = save_gpt(out, model, tok, {"merged_from": {
        "adapter": os.path.abspath(args.adapter), "base": info["base"],
        "method": info.get("method", "lora")}})
    result = {"merged": path, "adapter": os.path.abspath(args.adapter), "base": info["base"],
              "method": info.get("method", "lora"), "max_logit_diff": diff,
              "bytes": os.path.getsize(os.path.join(path, "model.safetensors"))}
    if args.hf_out and llama:   # a toy Llama: the weights only (its characters are no tokenizer.json)
        result["hf"] = os.path.abspath(save_llama_folder(model, args.hf_out))
    elif args.hf_out:
        result["hf"] = os.path.abspath(model.save_hf(args.hf_out, tok))
    if args.json:
        print_json(result)
        return 0
    print(f"merged {args.adapter} into {info['base']} -> {path} "
          f"({result['bytes'] / 2**20:.2f} MiB); logits match (max difference {diff:.2g})")
    if args.hf_out:
        what = ("llama folder (weights and config; no tokenizer.json)" if llama else
                "GPT-2 folder (transformers: GPT2LMHeadModel.from_pretrained)")
        print(f"Hugging Face {what} -> {args.hf_out}")
    print(f"try: tinylora generate --checkpoint {out} --prompt 'def '")
    return 0


def _save_llama(args, model, info, out, diff) -> int:
    """The merged Llama as a Hugging Face folder (and again at --hf-out when given)."""
    from ..apps.llama import save_llama_folder

    for folder in [out] + ([args.hf_out] if args.hf_out else []):
        save_llama_folder(model, folder, tokenizer_from=info["base"])
    result = {"merged": os.path.abspath(out), "adapter": os.path.abspath(args.adapter),
              "base": info["base"], "method": info.get("method", "lora"), "max_logit_diff": diff,
              "bytes": os.path.getsize(os.path.join(out, "model.safetensors"))}
    if args.hf_out:
        result["hf"] = os.path.abspath(args.hf_out)
    if args.json:
        print_json(result)
        return 0
    print(f"merged {args.adapter} into {info['base']} -> {out} ({result['bytes'] / 2**20:.2f} MiB), "
          f"a Hugging Face {model.config.model_type} folder (transformers: "
          f"AutoModelForCausalLM.from_pretrained); logits match (max difference {diff:.2g})")
    print(f"try: tinylora generate --pretrained {out} --prompt 'Hello'")
    return 0
