"""Pictures: the autograd graph as Graphviz DOT (and SVG where `dot` is installed), and
loss curves as PNG (through matplotlib, an optional extra).

In the graph, boxes are ops ("op\\nshape"), ellipses are leaf tensors: frozen weights grey,
trainable parameters highlighted (LoRA's A and B orange), inputs white. Solid arrows are the
forward pass. Red dashed arrows run backwards along every path a gradient takes from the
loss to a trainable parameter, labelled with the gradient's shape; a frozen weight has no
red arrow because its gradient is never computed, and ops whose backward never runs (the
frozen path) are drawn grey.

``draw_lora_layer`` and ``draw_lora_model`` build the two pictures `tinylora graph` shows.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .tensor import Tensor

__all__ = ["to_dot", "write_graph", "plot_loss_curves", "draw_lora_layer", "draw_lora_model"]


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(map(str, t.shape)) + ")" if t.shape else "()"


def _walk(root: Tensor):
    """Every tensor reachable from root through the recorded graph (iteratively)."""
    seen, order, stack = {id(root)}, [], [root]
    while stack:
        t = stack.pop()
        order.append(t)
        node = t._node
        if node is not None:
            if not node.parents and node.backward is None:
                raise RuntimeError("the graph was freed by backward(); draw it before calling "
                                   "backward, or pass retain_graph=True")
            for p in node.parents:
                if id(p) not in seen:
                    seen.add(id(p))
                    stack.append(p)
    return order


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def to_dot(loss: Tensor, params: dict | None = None, title: str = "autograd graph") -> str:
    """The graph that produced ``loss`` as DOT text. Build the forward inside
    ``tl.tensor.record_graph()`` so that frozen paths (no gradient) are recorded too.

    params: {name: tensor} (e.g. ``dict(model.named_parameters())``) to label leaves; names
    containing "lora_" are drawn as LoRA parameters.
    """
    names = {id(t): n for n, t in (params or {}).items()}
    tensors = _walk(loss)
    # tensors on a gradient path: they require grad and lead (forward) to the loss
    on_path = {id(t) for t in tensors if t.requires_grad}
    lines = [
        "digraph autograd {",
        f'  label="{_esc(title)}"; labelloc=t; fontname="Helvetica"; rankdir=BT;',
        '  node [fontname="Helvetica", fontsize=10]; edge [fontname="Helvetica", fontsize=9];',
    ]
    for t in tensors:
        tid = f"t{id(t)}"
        node = t._node
        if node is None:
            name = names.get(id(t)) or t.name or (
                f"const {t.data.reshape(-1)[0]:.3g}" if t.data.size == 1 else "input")
            if "lora_" in name and t.requires_grad:
                style = 'style=filled, fillcolor="#ffb347", penwidth=2'
                kind = "trainable LoRA"
            elif t.requires_grad:
                style = 'style=filled, fillcolor="#9fd4a3"'
                kind = "trainable"
            elif id(t) in names:
                style = 'style=filled, fillcolor="#d0d0d0", fontcolor="#555555"'
                kind = "frozen"
            else:
                style = 'style=filled, fillcolor="white"'
                kind = "constant" if t.data.size == 1 and not t.name else "input"
            label = f"{_esc(name)}\\n{_shape(t)}" + (f"\\n{kind}" if kind != name else "")
            lines.append(f'  {tid} [shape=ellipse, {style}, label="{label}"];')
        else:
            bold = ", penwidth=2.5" if t is loss else ""
            label = f"{node.op}\\n{_shape(t)}" + ("\\n(loss)" if t is loss else "")
            if id(t) in on_path:
                fill = 'fillcolor="#e8f0fe"'
            else:   # recorded only for the picture: no gradient flows through it
                fill = 'fillcolor="#f2f2f2", color="#999999", fontcolor="#777777"'
                label += "\\nno backward"
            lines.append(f'  {tid} [shape=box, style="rounded,filled", {fill}{bold}, label="{label}"];')
    for t in tensors:
        node = t._node
        if node is None:
            continue
        for p in node.parents:
            lines.append(f"  t{id(p)} -> t{id(t)} [color=\"#555555\"];")
            if id(p) in on_path and id(t) in on_path:
                lines.append(f'  t{id(t)} -> t{id(p)} [color="#d62728", style=dashed, '
                             f'constraint=false, label="d{_shape(p)}", fontcolor="#d62728"];')
    lines.append('  subgraph cluster_legend { label="legend"; fontsize=9; style=dotted;')
    lines.append('    l1 [shape=plaintext, fontsize=9, label="black: forward    red dashed: gradient '
                 '(dL/d·, its shape) on every path from the loss to a trainable parameter\\n'
                 'grey: frozen weights and ops without a backward    orange: LoRA A / B    '
                 'green: other trainable"]; }')
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_graph(loss: Tensor, path_stem, params: dict | None = None,
                title: str = "autograd graph") -> list:
    """Write ``<stem>.dot`` and, when Graphviz's ``dot`` is installed, ``<stem>.svg``.

    Returns the paths written; the SVG is skipped (not an error) without Graphviz.
    """
    from .io import atomic_write_text

    stem = Path(path_stem)
    dot_path = stem.with_suffix(".dot")
    text = to_dot(loss, params, title)
    atomic_write_text(dot_path, text)
    written = [dot_path]
    exe = shutil.which("dot")
    if exe:
        svg = subprocess.run([exe, "-Tsvg"], input=text.encode(), capture_output=True, check=True).stdout
        from .io import atomic_write_bytes
        svg_path = stem.with_suffix(".svg")
        atomic_write_bytes(svg_path, svg)
        written.append(svg_path)
    return written


def plot_loss_curves(curves: dict, path, title: str = "validation loss", xlabel: str = "step",
                     ylabel: str = "loss"):
    """Draw {label: [(step, loss), ...]} as one PNG. Returns the path, or None (with a one-line
    note on stderr) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import sys
        print("note: matplotlib is not installed, so no loss-curve PNG was drawn "
              "(pip install 'tinylora[plot]')", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, pts in curves.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=label, marker="o", markersize=2.5, linewidth=1.5)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    import io as _io
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    from .io import atomic_write_bytes
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


# ----------------------------------------------------------------------------- the pictures

def draw_lora_layer(path_stem, in_features: int = 8, out_features: int = 6, r: int = 2,
                    batch: int = 4, seed: int = 0) -> list:
    """The forward and backward of one Linear with a LoRA adapter: y = x Wᵀ + b +
    (alpha/r)·(x Aᵀ) Bᵀ with W, b frozen, a small input x and the scalar loss mean(y²).
    Writes ``<stem>.dot`` (and ``.svg`` with Graphviz); returns the paths."""
    from . import backend, lora, nn
    from .tensor import Tensor, record_graph

    class OneLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(in_features, out_features)

        def forward(self, x):
            return self.proj(x)

    backend.manual_seed(seed)
    model = OneLayer()
    lora.inject(model, lora.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
    x = Tensor(backend.randn(batch, in_features))
    x.name = "x"
    layer = model.proj
    with record_graph():
        # the layer's unfused path (LoraLayer.forward with several adapters, DoRA or a 4-bit
        # base); one plain adapter runs as the single op F.lora_linear with the same values
        # and gradients, which would hide the steps drawn here
        base_out = layer.base_layer(x)
        y = base_out + layer._delta("default", x, base_out)
        loss = (y * y).mean()
    title = (f"one LoRA layer: y = x·Wᵀ + b + (α/r)·(x·Aᵀ)·Bᵀ  (W {out_features}x{in_features} "
             f"frozen, r = {r}, α/r = 2), loss = mean(y²)")
    return write_graph(loss, path_stem, dict(model.named_parameters()), title)


def draw_lora_model(path_stem, seed: int = 0) -> list:
    """A whole (tiny) GPT with LoRA on its attention projections, forward and backward:
    one block, 8 features, 4 positions, and the cross-entropy loss of 2 sequences."""
    from . import backend, lora
    from .backend import np
    from .models.gpt import GPT, GPTConfig
    from .tensor import record_graph

    backend.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=2, n_embd=8))
    lora.inject(model, lora.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "attn.c_proj"]))
    rng = np.random.default_rng(seed)
    idx, targets = rng.integers(0, 10, (2, 4)), rng.integers(0, 10, (2, 4))
    with record_graph():
        _, loss = model(idx, targets)
    title = ("a 1-block GPT with LoRA (r = 2) on attn.c_attn and attn.c_proj: "
             "gradients reach only the adapters")
    return write_graph(loss, path_stem, dict(model.named_parameters()), title)
