"""The demo's pipeline at a micro size: its results, its files, its base cache, its table."""
import json
import os
from dataclasses import replace

import pytest

from tinylora.apps.demo import QUICK, SETTINGS, DemoSettings, format_report, run_demo

MICRO = DemoSettings(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4,
                     pretrain_iters=6, finetune_iters=4, eval_interval=2, eval_iters=1,
                     sample_tokens=16)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    logs = []
    return out, run_demo(out, settings=MICRO, isolate=False, progress=False, log=logs.append), logs


def test_results_cover_every_method(demo):
    out, res, logs = demo
    assert not res["base"]["cached"] and "pretraining" in logs[0]
    full, lora, qlora = (res["methods"][m] for m in ("full", "lora", "qlora"))
    assert full["trainable"] == full["total"] and full["trainable_pct"] == 100.0
    assert 0 < lora["trainable"] == qlora["trainable"] < full["trainable"]
    assert lora["val_before"] == pytest.approx(full["val_before"])   # the same base, same windows
    assert qlora["val_before"] != lora["val_before"]                 # the 4-bit base differs a little
    for r in (full, lora, qlora):
        assert r["steps"] == MICRO.finetune_iters and r["ms_per_step"] > 0
        assert r["val_after"] < r["val_before"]
        assert r["sample"].startswith(MICRO.prompt) and len(r["sample"]) == 4 + MICRO.sample_tokens
    assert lora["saved_bytes"] < full["saved_bytes"]
    assert qlora["state_bytes"] < lora["state_bytes"] < full["state_bytes"]


def test_files_are_where_the_report_says(demo):
    out, res, _ = demo
    for name in ("lora-adapter", "qlora-adapter"):
        assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(out / name))
    assert {"model.safetensors", "config.json"} <= set(os.listdir(out / "full"))
    assert (out / "lora_layer_graph.dot").read_text().startswith("digraph")
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["methods"]["lora"]["val_after"] == res["methods"]["lora"]["val_after"]
    text = format_report(res)
    for word in ("full", "lora", "qlora", "trainable", "val loss", "peak RSS", "--- base"):
        assert word in text


def test_the_output_list_names_everything_written_and_why_an_svg_is_missing(demo):
    out, res, _ = demo
    listing = format_report(res).split("\noutput: ")[1]
    for entry in os.listdir(out):                   # base/ included
        name = entry + "/" if (out / entry).is_dir() else entry
        assert f" {name}" in listing, name
    has_svg = (out / "lora_layer_graph.svg").is_file()
    assert ("no .svg (Graphviz's `dot` is not installed" in listing) != has_svg
    without = {**res, "files": {**res["files"], "graph": ["lora_layer_graph.dot"]}}
    assert "no .svg (Graphviz's `dot` is not installed" in format_report(without)


def test_a_matching_base_is_reused_and_a_different_one_is_not(demo):
    out, first, _ = demo
    logs = []
    again = run_demo(out, settings=MICRO, isolate=False, progress=False, log=logs.append)
    assert again["base"]["cached"] and "reusing" in logs[0]
    assert again["methods"]["lora"]["val_after"] == first["methods"]["lora"]["val_after"]
    logs.clear()
    other = run_demo(out, settings=replace(MICRO, seed=1), isolate=False, progress=False,
                     log=logs.append)
    assert not other["base"]["cached"] and "different pretraining settings or seed" in logs[0]


def test_isolated_phases_report_their_own_peak_memory(tmp_path):
    res = run_demo(tmp_path, settings=replace(MICRO, pretrain_iters=2, finetune_iters=2),
                   progress=False, log=lambda m: None)
    assert all(r["peak_rss_mb"] > 10 for r in res["methods"].values())


def test_the_settings_are_sane():
    for s in (SETTINGS, QUICK):
        assert s.n_embd % s.n_head == 0 and s.finetune_iters % s.eval_interval == 0
    assert QUICK.pretrain_iters < SETTINGS.pretrain_iters


def test_a_failing_phase_is_one_clear_error(tmp_path):
    bad = replace(MICRO, pretrain_iters=2, finetune_iters=2, target_modules="no_such_layer")
    with pytest.raises(RuntimeError, match="demo phase 'lora' failed: .*no_such_layer") as e:
        run_demo(tmp_path, settings=bad, progress=False, log=lambda m: None)
    assert "\n" not in str(e.value)


def test_the_command_prints_the_same_results_as_json(tmp_path, monkeypatch, capsys):
    import tinylora.apps.demo as demo_module
    from tinylora.cli import main
    monkeypatch.setattr(demo_module, "QUICK", MICRO)          # --quick, at the micro size
    assert main(["demo", "--quick", "--in-process", "--json", "--out", str(tmp_path)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["methods"]) == {"full", "lora", "qlora"}
    assert res == json.loads((tmp_path / "metrics.json").read_text())
    assert main(["demo", "--quick", "--in-process", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "reused from" in text and "qlora-adapter/adapter_model.safetensors" in text
