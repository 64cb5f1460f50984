"""Session fixtures: tiny generated MiniMax-M2 checkpoints (several shards) and the shared fixtures.

The shared fixtures live in ``../shared`` beside the repository (present on developer machines and in
CI, absent in a user's clone): tests that need them are skipped with the reason, which says where they come from.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def import_or_skip(module: str, package: str):
    """``module``, or skip with the real reason: ``package`` is not installed (and how to install it), or it is but
    importing it fails (a dependency of its own missing, say), with the ImportError's message, not "not installed".
    Test modules use it as ``from conftest import import_or_skip``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if missing == module.partition(".")[0]:
            pytest.skip(f"{package} is not installed (pip install -e '.[dev]')")
        if missing and (module == missing or module.startswith(missing + ".")):
            pytest.skip(f"{package} is installed but has no {missing} (another version: pip install -e '.[dev]')")
        pytest.skip(f"{package} is installed but `import {module}` fails: {err} (install what it names, or reinstall "
                    f"{package})")
    except Exception as err:  # noqa: BLE001 - an import that fails on anything else: its own message, not "missing"
        message = " ".join(str(err).split())
        pytest.skip(f"{package} is installed but `import {module}` fails: {type(err).__name__}: {message}")


def _shared(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the project's shared fixtures (trained mini models, calibration "
                    f"and eval corpora and released configs, described in {SHARED / 'README.md'}), which are not part of "
                    "the repository: CI and developer machines provide them read-only as ../shared beside the checkout")
    return path


@pytest.fixture(scope="session")
def tiny_fp32(tmp_path_factory) -> Path:
    from reap.testing.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-fp32", seed=0, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory) -> Path:
    from reap.testing.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-bf16", seed=1, dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def tiny_fp8(tmp_path_factory, tiny_bf16) -> Path:
    from reap.testing.tiny_formats import convert_to_fp8

    return convert_to_fp8(tiny_bf16, tmp_path_factory.mktemp("models") / "tiny-fp8")


@pytest.fixture(scope="session")
def mini_m2() -> Path:
    return _shared("fixtures/mini-m2")


@pytest.fixture(scope="session")
def mini_m2_fp8() -> Path:
    return _shared("fixtures/mini-m2-fp8")


@pytest.fixture(scope="session")
def real_configs() -> Path:
    """Released config.json files (and some indexes and tokenizers) of real MoE checkpoints, no weights."""
    return _shared("real-configs")


@pytest.fixture(scope="session")
def calibration_data() -> Path:
    return _shared("data/calibration.jsonl.gz")


@pytest.fixture(scope="session")
def eval_data() -> Path:
    return _shared("data/eval.jsonl.gz")
