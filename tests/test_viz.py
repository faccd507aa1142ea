"""The autograd picture marks frozen weights, LoRA parameters and the gradient path."""
import builtins
import re

import pytest

import tinylora as tl
from tinylora import functional as F
from tinylora import nn, viz
from tinylora.tensor import record_graph


def _lora_like():
    W = nn.Parameter(tl.randn(6, 8).data, requires_grad=False)
    A, B = nn.Parameter(tl.randn(2, 8).data), nn.Parameter(tl.randn(6, 2).data)
    x = tl.randn(4, 8)
    with record_graph():
        y = F.linear(x, W) + F.linear(F.linear(x, A), B) * 0.5
        loss = (y * y).mean()
    return loss, {"base.weight": W, "lora_A.default": A, "lora_B.default": B}


def _node_id(dot, label):
    return re.search(rf'(t\d+) \[[^\]]*label="{re.escape(label)}', dot).group(1)


def test_dot_marks_frozen_lora_and_the_gradient_path():
    loss, params = _lora_like()
    dot = viz.to_dot(loss, params)
    w, a, b = (_node_id(dot, n) for n in ("base.weight", "lora_A.default", "lora_B.default"))
    assert "frozen" in dot and dot.count("trainable LoRA") == 2
    red_targets = set(re.findall(r'-> (t\d+) \[color="#d62728"', dot))
    assert a in red_targets and b in red_targets      # gradient reaches A and B
    assert w not in red_targets                        # never the frozen weight
    assert re.search(rf"{w} -> t\d+ \[color=\"#555555\"\]", dot)  # but it is in the forward


def test_drawing_a_freed_graph_is_a_clear_error():
    loss, params = _lora_like()
    loss.backward()
    with pytest.raises(RuntimeError, match="freed"):
        viz.to_dot(loss, params)


def test_write_graph_writes_dot(tmp_path):
    loss, params = _lora_like()
    paths = viz.write_graph(loss, tmp_path / "lora", params)
    assert paths[0].suffix == ".dot" and paths[0].read_text().startswith("digraph")


def test_loss_curves_without_matplotlib_is_a_note_not_a_crash(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert viz.plot_loss_curves({"lora": [(0, 2.0), (10, 1.5)]}, tmp_path / "c.png") is None
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_loss_curves_png_is_drawn_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra (pip install 'tinylora[plot]')")
    import struct

    import matplotlib.image
    import numpy as np
    out = viz.plot_loss_curves({"lora": [(0, 2.0), (10, 1.5), (20, 1.2)],
                                "full": [(0, 2.0), (10, 1.4)]}, tmp_path / "c.png")
    assert out == tmp_path / "c.png"
    raw = out.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", raw[16:24]) == (768, 480)          # 6.4 x 4.0 in at 120 dpi
    rgb = matplotlib.image.imread(out)[..., :3]
    for color in ((0x1f, 0x77, 0xb4), (0xff, 0x7f, 0x0e)):          # the two curves were drawn
        assert (np.abs(rgb - np.array(color) / 255).max(axis=-1) < 0.02).sum() > 50
    assert not list(tmp_path.glob(".c.png.tmp-*"))                  # written atomically


def _red_targets(dot):
    return set(re.findall(r'-> (t\d+) \[color="#d62728"', dot))


def test_lora_layer_picture_marks_the_path_to_a_and_b(tmp_path):
    paths = viz.draw_lora_layer(tmp_path / "layer")
    dot = paths[0].read_text()
    a, b = _node_id(dot, "proj.lora_A.default.weight"), _node_id(dot, "proj.lora_B.default.weight")
    w = _node_id(dot, "proj.base_layer.weight")
    assert {a, b} <= _red_targets(dot) and w not in _red_targets(dot)
    assert "no backward" in dot                  # x·Wᵀ + b runs forward only
    assert "(4, 8)" in dot and "(2, 8)" in dot and "(6, 2)" in dot


def test_lora_layer_picture_draws_the_layers_own_values():
    """The unfused ops drawn give the same output as the layer's forward."""
    import numpy as np
    from tinylora import backend, lora

    backend.manual_seed(0)
    layer = nn.Linear(8, 6)
    holder = nn.ModuleList([layer])
    lora.inject(holder, lora.LoraConfig(r=2, lora_alpha=4, target_modules=["0"],
                                        init_lora_weights=False))
    wrapped = holder[0]
    x = tl.randn(4, 8)
    base = wrapped.base_layer(x)
    drawn = base + wrapped._delta("default", x, base)
    np.testing.assert_allclose(drawn.numpy(), wrapped(x).numpy(), rtol=1e-5, atol=1e-6)


def test_model_picture_reaches_only_the_adapters(tmp_path):
    dot = viz.draw_lora_model(tmp_path / "model")[0].read_text()
    red = _red_targets(dot)
    leaves = re.findall(r'(t\d+) \[shape=ellipse[^\]]*label="([^"\\]+)', dot)
    lora_ids = {i for i, name in leaves if "lora_" in name}
    frozen = {i for i, name in leaves if "lora_" not in name and name.startswith("transformer")}
    assert len(lora_ids) == 4 and lora_ids <= red and not (frozen & red)


def test_svg_is_written_when_graphviz_is_installed(tmp_path):
    import shutil
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed")
    paths = viz.draw_lora_layer(tmp_path / "layer")
    assert [p.suffix for p in paths] == [".dot", ".svg"]
    assert "<svg" in paths[1].read_text()
