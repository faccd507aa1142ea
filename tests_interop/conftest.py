"""Interoperability tests: tinylora's files read by PyTorch, transformers and PEFT.

These run in their own virtual environment (``.ci/run`` makes it) with torch, transformers
and peft installed next to tinylora; the package and the main suite (``tests/``) stay
torch-free, and ``pytest`` alone does not collect this folder (pyproject's testpaths).
Run: ``pytest tests_interop`` in such an environment. Nothing is downloaded.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")           # before transformers is imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
GPT2_TINY = FIXTURES / "gpt2_tiny"
BPE = FIXTURES / "gpt2_bpe"


def pytest_report_header(config):
    import peft
    import transformers
    return (f"interop: torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}")


@pytest.fixture(autouse=True)
def _torch_state():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


def randomize_adapters(model, seed=0, std=0.1):
    """Give every LoRA A and B (and trainable bias) random values: a fresh adapter is zero."""
    import tinylora as tl
    rng = np.random.default_rng(seed)
    with tl.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or (p.requires_grad and name.endswith("bias")):
                p.data[...] = tl.backend.asarray(rng.normal(0, std, p.shape).astype(p.data.dtype))


def numpy_of(t):
    return t.detach().cpu().numpy()
