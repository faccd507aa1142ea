"""Pictures: the autograd graph as Graphviz DOT (and SVG where `dot` is installed), and
loss curves as PNG (through matplotlib, an optional extra).

In the graph, boxes are ops ("op\\nshape"), ellipses are leaf tensors: frozen weights grey,
trainable parameters highlighted (LoRA's A and B orange), inputs white. Solid arrows are the
forward pass. Red dashed arrows run backwards along every path a gradient takes from the
loss to a trainable parameter, labelled with the gradient's shape; a frozen weight has no
red arrow because its gradient is never computed.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .tensor import Tensor

__all__ = ["to_dot", "write_graph", "plot_loss_curves"]


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
            lines.append(f'  {tid} [shape=ellipse, {style}, label="{_esc(name)}\\n{_shape(t)}\\n{kind}"];')
        else:
            bold = ", penwidth=2.5" if t is loss else ""
            label = f"{node.op}\\n{_shape(t)}" + ("\\n(loss)" if t is loss else "")
            lines.append(f'  {tid} [shape=box, style="rounded,filled", fillcolor="#e8f0fe"{bold}, label="{label}"];')
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
    lines.append('    l1 [shape=plaintext, fontsize=9, label="black: forward    red dashed: gradient path to trainable parameters\\n'
                 'grey: frozen (no gradient computed)    orange: LoRA A / B"]; }')
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
