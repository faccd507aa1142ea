"""Train a character-level GPT from scratch. Checkpoints go to OUT/checkpoints/ (latest.json
points at the newest), metrics to OUT/metrics.jsonl. --resume continues the run in OUT exactly
where its latest checkpoint left off. Built-in corpora: builtin:prose (English), builtin:python
(Python source). --arch llama trains a toy Llama instead (RMSNorm, rotary positions, SwiGLU,
grouped-query attention, tied head; --n-embd is hidden_size, --block-size
max_position_embeddings), character-level like the GPT; `tinylora generate --checkpoint OUT`
samples from either.
"""
from __future__ import annotations

from dataclasses import fields

from .common import add_command, add_json, add_out, print_json

# flag -> (GPTConfig field, type, help); default None = GPT_DEFAULTS (or the saved run's value)
_MODEL_FLAGS = {
    "--n-layer": ("n_layer", int, "transformer blocks"),
    "--n-head": ("n_head", int, "attention heads per block"),
    "--n-embd": ("n_embd", int, "embedding width (divisible by --n-head)"),
    "--block-size": ("block_size", int, "context length in characters"),
    "--dropout": ("dropout", float, "dropout probability"),
}
# flag -> (TrainConfig field, type, help); default None = TrainConfig's (or the saved run's)
_TRAIN_FLAGS = {
    "--batch-size": ("batch_size", int, "sequences per micro-batch"),
    "--grad-accum": ("grad_accum_steps", int, "micro-batches per optimizer step"),
    "--max-iters": ("max_iters", int, "optimizer steps in all (a resumed run continues to this)"),
    "--lr": ("lr", float, "peak learning rate (AdamW)"),
    "--min-lr": ("min_lr", float, "learning rate at the end of the cosine decay"),
    "--warmup": ("warmup_iters", int, "linear warmup steps"),
    "--weight-decay": ("weight_decay", float, "AdamW decoupled weight decay (matrices only)"),
    "--grad-clip": ("grad_clip", float, "max global gradient norm (0 = off)"),
    "--eval-interval": ("eval_interval", int, "steps between evaluations and checkpoints"),
    "--eval-iters": ("eval_iters", int, "batches per evaluation"),
    "--log-interval": ("log_interval", int, "steps between metrics.jsonl lines"),
    "--seed": ("seed", int, "random seed (weights, data order, dropout)"),
}


def register(sub, name, summary):
    p = add_command(sub, name, summary, __doc__)
    p.add_argument("--arch", choices=["gpt", "llama"], default=None,
                   help="model architecture (default: gpt; on --resume: the run's)")
    from ..apps.train import GPT_DEFAULTS
    from ..train import TrainConfig
    p.add_argument("--data", default=None,
                   help="required (except with --resume, which uses the run's): builtin:prose, "
                        "builtin:python or a UTF-8 text file")
    add_out(p, "runs/gpt", "run folder for checkpoints and metrics", what="run folder")
    # None means "the library's default, or on --resume the saved run's": show the former
    defaults = {**GPT_DEFAULTS, **{f.name: f.default for f in fields(TrainConfig)}}
    for flag, (field, tp, text) in {**_MODEL_FLAGS, **_TRAIN_FLAGS}.items():
        shown = defaults.get(field)
        shown = "lr/10" if field == "min_lr" else shown
        p.add_argument(flag, type=tp, default=None,
                       help=f"{text} (default: {shown}; on --resume: the run's)")
    p.add_argument("--n-kv-head", type=int, default=None,
                   help="--arch llama: key/value heads, each shared by n-head / n-kv-head query "
                        "heads (default: 2; on --resume: the run's)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip steps whose loss or gradient is NaN/Inf instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json(p)
    p.set_defaults(func=run, resume_hint="tinylora train --out {out} --resume",
                   setting_flags={f: flag for flag, (f, _, _) in _TRAIN_FLAGS.items()})


def run(args) -> int:
    from ..apps.train import train_gpt

    model_args = {f: getattr(args, flag[2:].replace("-", "_"))
                  for flag, (f, _, _) in _MODEL_FLAGS.items()}
    train_args = {f: getattr(args, flag[2:].replace("-", "_"))
                  for flag, (f, _, _) in _TRAIN_FLAGS.items()}
    model_args = {k: v for k, v in model_args.items() if v is not None}
    train_args = {k: v for k, v in train_args.items() if v is not None}
    if args.skip_nonfinite:
        train_args["skip_nonfinite"] = True
    if args.no_progress or args.json:
        train_args["progress"] = False
    if args.data is None and not args.resume:
        raise ValueError("--data is required: builtin:prose, builtin:python or a text file")
    if _arch(args) == "llama":
        from ..apps.llama import train_llama
        model, tok, result = train_llama(args.data, args.out,
                                         model_args=_llama_args(model_args, args),
                                         train_args=train_args, resume=args.resume)
    else:
        if args.n_kv_head is not None:
            raise ValueError("--n-kv-head is for --arch llama (a GPT has one K/V head per head)")
        model, tok, result = train_gpt(args.data, args.out, model_args=model_args,
                                       train_args=train_args, resume=args.resume)
    summary = {"steps": result.step, "start_step": result.start_step, "params": model.num_parameters(),
               "vocab_size": tok.vocab_size, "skipped_steps": result.skipped,
               "first_eval": result.evals[0] if result.evals else None,
               "last_eval": result.evals[-1] if result.evals else None,
               "checkpoint": result.checkpoint, "seconds": round(result.elapsed_s, 2)}
    if args.json:
        print_json(summary)
        return 0
    if args.resume and result.step == result.start_step:
        print(f"the run in {args.out} is already finished (step {result.step}); nothing to do — "
              "give a larger --max-iters to train further")
        return 0
    print(f"trained {result.step} steps ({model.num_parameters():,} parameters) in "
          f"{result.elapsed_s:.1f}s" + (f", {result.skipped} non-finite steps skipped"
                                         if result.skipped else ""))
    if result.evals:
        a, b = result.evals[0], result.evals[-1]
        print(f"val loss {a['val_loss']:.4f} (step {a['step']}) -> {b['val_loss']:.4f} "
              f"(step {b['step']})")
    if result.checkpoint:
        print(f"checkpoint: {result.checkpoint}")
        print(f"try: tinylora generate --checkpoint {args.out} --prompt 'The '")
    return 0


_LLAMA_NAMES = {"n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
                "n_embd": "hidden_size", "block_size": "max_position_embeddings",
                "dropout": "attention_dropout"}


def _arch(args) -> str:
    """--arch, or on --resume the architecture of the run in --out (which it must match)."""
    if not args.resume:
        return args.arch or "gpt"
    from ..apps.llama import checkpoint_model_type
    saved = {"GPT": "gpt", "Llama": "llama"}.get(checkpoint_model_type(args.out))
    if args.arch is not None and saved is not None and args.arch != saved:
        raise ValueError(f"the run in {args.out} trains a {saved}, not a {args.arch}; leave out "
                         "--arch, or start a new run in another --out folder")
    return saved or args.arch or "gpt"


def _llama_args(model_args: dict, args) -> dict:
    out = {_LLAMA_NAMES[k]: v for k, v in model_args.items()}
    if args.n_kv_head is not None:
        out["num_key_value_heads"] = args.n_kv_head
    return out
