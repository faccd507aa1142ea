"""Record the forward pass and draw it with its backward: ops with their output shapes, frozen
weights grey, LoRA's A and B orange, and red dashed arrows for the gradient path from the loss
back to A and B. Writes OUT/NAME.dot, and OUT/NAME.svg when Graphviz's `dot` is installed
(apt-get install graphviz).
"""
from __future__ import annotations

import os
import shutil

from .common import add_command, add_json, add_out, add_seed, print_json

_WHAT = {"lora-layer": "lora_layer_graph", "model": "lora_model_graph"}


def register(sub, name, summary):
    p = add_command(sub, name, summary, __doc__)
    p.add_argument("--what", choices=sorted(_WHAT), default="lora-layer",
                   help="lora-layer: one Linear with LoRA r=2, a 4x8 input and loss mean(y²); "
                        "model: a 1-block GPT with LoRA on its attention")
    add_out(p, "graphs", "output folder")
    add_seed(p)
    add_json(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import viz
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, _WHAT[args.what])
    draw = viz.draw_lora_layer if args.what == "lora-layer" else viz.draw_lora_model
    paths = [str(p) for p in draw(stem, seed=args.seed)]
    svg = any(p.endswith(".svg") for p in paths)
    if args.json:
        print_json({"what": args.what, "files": paths, "svg": svg})
        return 0
    for p in paths:
        print(f"wrote {p}")
    if not svg:
        print("no SVG: Graphviz's `dot` is not installed (apt-get install graphviz, or render the "
              f"DOT file elsewhere: dot -Tsvg {stem}.dot -o {stem}.svg)")
    elif shutil.which("dot"):
        print(f"PNG: dot -Tpng {stem}.dot -o {stem}.png")
    return 0
