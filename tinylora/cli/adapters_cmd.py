"""List the LoRA adapter folders (adapter_config.json + adapter_model.safetensors) under a folder,
or inspect one: its config, tensors, size, base fingerprint, and with --base whether it fits
that base model.
"""
from __future__ import annotations

import os

from .common import add_command, add_json, print_json, table


def register(sub, name, summary):
    p = add_command(sub, name, summary, __doc__)
    actions = p.add_subparsers(dest="action", metavar="ACTION", title="actions", required=True)
    ls = add_command(actions, "list", "adapter folders under DIR, one line each")
    ls.add_argument("dir", nargs="?", default=".", metavar="DIR", help="folder to search")
    add_json(ls)
    ls.set_defaults(func=run_list)
    ins = add_command(actions, "inspect", "config, tensor keys and shapes, size, fingerprint")
    ins.add_argument("dir", metavar="DIR", help="the adapter folder")
    ins.add_argument("--base", default=None,
                     help="check the adapter against this base checkpoint (shapes and fingerprint)")
    add_json(ins)
    ins.set_defaults(func=run_inspect)


def _describe(folder) -> dict:
    """The facts of one adapter folder, read from its files without loading any model."""
    from ..apps.finetune import finetune_info
    from ..io import load_json, read_safetensors_header
    from ..lora.adapters import CONFIG_NAME, FINGERPRINT_KEY, WEIGHTS_NAME
    cfg = load_json(os.path.join(folder, CONFIG_NAME))
    if not isinstance(cfg, dict):
        raise ValueError(f"{os.path.join(folder, CONFIG_NAME)}: not a JSON object")
    weights = os.path.join(folder, WEIGHTS_NAME)
    header, meta = read_safetensors_header(weights)
    tensors = [{"key": k, "shape": list(v["shape"]), "dtype": v["dtype"]}
               for k, v in sorted(header.items())]
    params = 0
    for t in tensors:
        n = 1
        for d in t["shape"]:
            n *= d
        params += n
    info = finetune_info(folder)
    tm = cfg.get("target_modules")
    return {"path": folder, "method": info.get("method", "lora"), "r": cfg.get("r"),
            "lora_alpha": cfg.get("lora_alpha"), "target_modules": tm,
            "base": cfg.get("base_model_name_or_path"), "params": params,
            "bytes": os.path.getsize(weights), "fingerprint": meta.get(FINGERPRINT_KEY),
            "config": cfg, "tensors": tensors, "finetune": info or None}


def run_list(args) -> int:
    from ..apps.finetune import is_adapter_dir
    if not os.path.isdir(args.dir):
        raise FileNotFoundError(f"{args.dir!r} is not a folder")
    found = []
    for root, dirs, _ in os.walk(args.dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if is_adapter_dir(root):
            found.append(_describe(root))
    if args.json:
        print_json([{k: v for k, v in d.items() if k not in ("config", "tensors")} for d in found])
        return 0
    if not found:
        print(f"no adapter folders under {args.dir}")
        return 0
    rows = [{"adapter": os.path.relpath(d["path"], args.dir), "method": d["method"], "r": d["r"],
             "alpha": d["lora_alpha"],
             "targets": ",".join(d["target_modules"]) if isinstance(d["target_modules"], list)
             else d["target_modules"],
             "params": f"{d['params']:,}", "size": f"{d['bytes'] / 2**10:.1f} KiB",
             "base": d["base"] or "-"} for d in found]
    print(table(rows))
    return 0


def _check_base(folder, base) -> dict:
    from ..apps.finetune import load_finetuned
    from ..lora import AdapterLoadError, BaseModelMismatchError
    try:
        load_finetuned(folder, base)
    except BaseModelMismatchError as e:
        return {"fits": False, "reason": "different base (fingerprint differs)", "detail": str(e)}
    except AdapterLoadError as e:
        return {"fits": False, "reason": "shapes or tensors do not fit", "detail": str(e)}
    return {"fits": True, "reason": "tensors fit and the base fingerprint matches "
            "(or the file has none)"}


def run_inspect(args) -> int:
    from ..apps.finetune import is_adapter_dir
    if not is_adapter_dir(args.dir):
        raise FileNotFoundError(f"{args.dir!r} is not an adapter folder (needs adapter_config.json "
                                "and adapter_model.safetensors)")
    d = _describe(args.dir)
    if args.base:
        d["base_check"] = {"base": args.base, **_check_base(args.dir, args.base)}
    if args.json:
        print_json(d)
        return 0
    cfg = d["config"]
    print(f"adapter {args.dir}  ({d['method']})")
    for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora",
              "use_dora", "modules_to_save", "base_model_name_or_path"):
        print(f"  {k:24} {cfg.get(k)}")
    print(f"  {'parameters':24} {d['params']:,} in {len(d['tensors'])} tensors, "
          f"{d['bytes']:,} bytes on disk")
    print(f"  {'base fingerprint':24} {d['fingerprint'] or '(none: not written by tinylora)'}")
    if d["finetune"]:
        extra = {k: v for k, v in d["finetune"].items() if k not in ("format", "version")}
        print(f"  {'training':24} {extra}")
    print()
    print(table([{"tensor": t["key"], "shape": "x".join(map(str, t["shape"])), "dtype": t["dtype"]}
                 for t in d["tensors"]]))
    if args.base:
        c = d["base_check"]
        print(f"\nbase {args.base}: {'fits' if c['fits'] else 'does NOT fit'}: {c['reason']}")
        if not c["fits"]:
            print(f"  {c['detail']}")
            return 1
    return 0
