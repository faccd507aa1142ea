"""Fine-tune a GPT, or a Llama-family model from a Hugging Face folder (Llama, SmolLM2, TinyLlama,
Qwen2: config.json's model_type llama or qwen2), on text or, for a Llama, instruction records.
LoRA (the default) trains low-rank adapters on a frozen base and saves them in PEFT's layout
(adapter_model.safetensors + adapter_config.json); --qlora first stores the frozen Linear
weights in 4-bit NF4; --full trains every weight and saves a whole checkpoint (a Hugging Face
folder for a Llama-family base). Use the result with `tinylora generate --adapter OUT` (or
--checkpoint OUT for --full; --pretrained OUT for a Llama's), or `tinylora merge`. A
Llama-family model trains with gradient checkpointing (each layer recomputed in the backward).
For a GPT, checkpoints (the adapter, or every weight with --full, with the optimizer and
trainer state) go to OUT/checkpoints/ as it trains; Ctrl-C saves one, and --resume continues
the run in OUT exactly.
"""
from __future__ import annotations

import os

from .common import add_command, add_json, add_out, flag_for, lora_config, print_json

_DEFAULT_LR = {"full": 1e-3, "lora": 3e-3, "qlora": 3e-3}


def register(sub, name, summary):
    p = add_command(sub, name, summary, __doc__)
    src = p.add_mutually_exclusive_group()    # one of them: required, except with --resume
    src.add_argument("--base", help="base model: a tinylora checkpoint folder or run folder")
    src.add_argument("--pretrained",
                     help="base model: a Hugging Face GPT-2 folder (config.json, model.safetensors, "
                          "vocab.json, merges.txt), or a Llama-family one (model_type llama or "
                          "qwen2: config.json, model.safetensors or its shards, tokenizer.json)")
    p.add_argument("--data", default=None,
                   help="required (except with --resume, which uses the run's): builtin:python, "
                        "builtin:prose or a UTF-8 text file (a character-level base needs text "
                        "in its vocabulary); for a Llama-family model also a .jsonl file of "
                        "instruction records (prompt/response or messages; the loss is on the "
                        "responses only)")
    p.add_argument("--ascii", dest="normalize_ascii", action="store_true",
                   help="fold the text to the built-in vocabulary first (typographic quotes and "
                        "dashes to ASCII, accents stripped, other characters dropped)")
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
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip steps whose loss or gradient is NaN/Inf instead of stopping")
    p.add_argument("--resume", action="store_true",
                   help="continue the fine-tune in --out with its own settings (--max-iters, "
                        "--lr, --batch-size, --eval-interval and --eval-iters may change)")
    p.add_argument("--no-check-base", dest="check_base", action="store_false",
                   help="with --resume: accept a checkpoint whose adapter was saved from a "
                        "different base model")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json(p)
    # --block-size is for a Llama base; a GPT base fixes its own, so hints do not offer it
    p.set_defaults(func=run, resume_hint="tinylora finetune --out {out} --resume",
                   setting_flags={"block_size": None})


# options a --resume may change: how the training goes on (the model, data and seed stay the run's)
_CHANGEABLE = {"max_iters", "lr", "batch_size", "eval_interval", "eval_iters"}
# options that are not part of the run itself: how this call prints, where and whether it resumes
_NOT_SAVED = {"func", "command", "out", "out_what", "resume", "resume_hint", "json", "no_progress",
              "debug", "debug_cmd", "threads", "check_base", "skip_nonfinite", "setting_flags"}


def _run_options(args) -> dict:
    """The options that define the fine-tune, as saved in each checkpoint's config.json
    (paths made absolute, so that --resume works from any folder)."""
    return {k: _absolute(v) for k, v in vars(args).items()
            if k not in _NOT_SAVED and not k.startswith("_")}


def _absolute(v):
    return os.path.abspath(v) if isinstance(v, str) and os.path.exists(v) else v


def _clear_run(out) -> None:
    """A new fine-tune in OUT starts a new run: the checkpoints, latest.json and metrics of
    an earlier one there go (its final adapter or checkpoint is overwritten at the end)."""
    import shutil
    for name in ("latest.json", "metrics.jsonl"):
        if os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)


def _resume_options(args, parser_defaults: dict):
    """On --resume: ``(args, checkpoint)`` with the run's saved options put into ``args`` (an
    option given with another value than the run's is an error), or ``(None, step)`` when the
    run in --out is already finished."""
    from ..checkpoint import resolve_checkpoint
    from ..io import FormatError, load_json

    out = args.out
    done = os.path.join(out, "config.json")      # a finished --full run: OUT is its checkpoint
    if not os.path.isfile(os.path.join(out, "latest.json")):
        info = load_json(done).get("finetune") if os.path.isfile(done) else None
        if isinstance(info, dict):
            return None, info.get("steps")
        raise FileNotFoundError(f"nothing to resume in {out!r}: it has no latest.json (no "
                                "checkpoint of a fine-tune); start one with --base or --pretrained")
    rel = load_json(os.path.join(out, "latest.json"))   # not OUT/config.json: an earlier --full result
    if not isinstance(rel, dict) or not isinstance(rel.get("checkpoint"), str):
        raise FormatError(f"{os.path.join(out, 'latest.json')}: expected {{\"checkpoint\": "
                          "\"checkpoints/step-...\", \"step\": N}")
    folder = resolve_checkpoint(os.path.join(out, rel["checkpoint"]))
    saved = load_json(os.path.join(folder, "config.json")).get("finetune_args")
    if not isinstance(saved, dict):
        raise ValueError(f"{folder} is not a checkpoint of `tinylora finetune` (its config.json "
                         "has no finetune_args); resume a `tinylora train` run with train --resume")
    for k, v in saved.items():
        given = getattr(args, k, None)
        if given != parser_defaults.get(k) and k in _CHANGEABLE:
            continue                                # e.g. a lower --lr after a NaN, more steps
        if given != parser_defaults.get(k) and _absolute(given) != v:
            flag = flag_for(args._parser, k) or k
            used = "its default" if v is None else repr(v)
            raise ValueError(f"cannot change {flag} when resuming (the run in {out} used "
                             f"{used}); --resume continues the run with its own model, data and "
                             "seed")
        setattr(args, k, v)
    step = load_json(os.path.join(folder, "trainer_state.json")).get("step")
    finished = step is not None and step >= args.max_iters
    from ..apps.finetune import is_adapter_dir
    if finished and (is_adapter_dir(out) or os.path.isfile(done)):
        return None, step
    return args, folder


def run(args) -> int:
    from .. import backend
    from ..data import load_data
    from ..apps.finetune import (adapter_checkpoints, finetune, load_base, load_pretrained,
                                 prepare, save_finetuned)
    from ..apps.llama import is_llama_folder
    from ..models.llama import Llama
    from ..train import TrainConfig

    where = False                               # with --resume: the checkpoint to continue from
    if args.resume:
        defaults = {a.dest: a.default for a in args._parser._actions}
        resumed, where = _resume_options(args, defaults)
        if resumed is None:
            print(f"the fine-tune in {args.out} is already finished (step {where}); nothing to do"
                  " — give a larger --max-iters to train further")
            return 0
    elif not (args.base or args.pretrained):
        raise ValueError("give the base model: --base (a tinylora checkpoint or run folder) "
                         "or --pretrained (a Hugging Face GPT-2 or Llama-family folder)")
    elif args.data is None:
        raise ValueError("--data is required: builtin:python, builtin:prose or a text file")
    method = "full" if args.full else "qlora" if args.qlora else "lora"
    if args.pretrained and is_llama_folder(args.pretrained):
        from .llama import finetune_llama
        _no_llama_resume(args)
        return finetune_llama(args, method)
    if args.pretrained:
        model, tok, base = load_pretrained(args.pretrained)
    else:
        model, tok, base = load_base(args.base)
    if isinstance(model, Llama):   # a toy Llama run (`tinylora train --arch llama`)
        from .llama import finetune_llama
        _no_llama_resume(args)
        return finetune_llama(args, method, loaded=(model, tok, base))
    if args.block_size is not None:
        raise ValueError("--block-size is for Llama-family models; a GPT trains on its own "
                         "block_size")
    data = load_data(args.data, tokenizer=tok, block_size=model.config.block_size,
                     fold_ascii=args.normalize_ascii)
    backend.manual_seed(args.seed)          # the adapters' initial values
    cfg = None if method == "full" else lora_config(args, "all-linear")
    info = prepare(model, method, cfg)
    train = TrainConfig(max_iters=args.max_iters, batch_size=args.batch_size,
                        lr=args.lr or _DEFAULT_LR[method], warmup_iters=max(1, args.max_iters // 10),
                        weight_decay=0.0, eval_interval=args.eval_interval,
                        eval_iters=args.eval_iters, seed=args.seed,
                        skip_nonfinite=args.skip_nonfinite,
                        progress=not (args.no_progress or args.json))
    # OUT is the run folder: checkpoints (only the adapter for LoRA / QLoRA) and metrics.jsonl
    ckpt = {} if method == "full" else adapter_checkpoints(check_base=args.check_base)
    if not args.resume:
        _clear_run(args.out)
    res = finetune(model, data, train, out_dir=args.out, resume=where,
                   run_config={"finetune_args": _run_options(args)}, **ckpt)
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


def _no_llama_resume(args) -> None:
    if args.resume:
        raise ValueError("--resume continues GPT fine-tunes; a Llama-family fine-tune cannot "
                         "resume yet: start it again without --resume")
