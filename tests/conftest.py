"""Shared test setup: offline hubs, no swanlab network, and fixtures. Helpers live in `minimind_hf.testing`."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SWANLAB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# After the environment above.
from minimind_hf.testing import SHARED_FIXTURES, TOKENIZER_DIR  # noqa: E402


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """`../shared/fixtures` beside the repo: reference outputs of the original MiniMind code."""
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {SHARED_FIXTURES} (they live beside the repo, not in it)")
    return SHARED_FIXTURES


@pytest.fixture(scope="session")
def datasets_cache(tmp_path_factory) -> Path:
    """Arrow caches of the datasets built by a test go to a temporary directory, not ~/.cache."""
    import datasets

    cache = tmp_path_factory.mktemp("datasets_cache")
    datasets.config.HF_DATASETS_CACHE = cache
    datasets.disable_progress_bars()
    return cache


@pytest.fixture(scope="session")
def project_tokenizer_dir() -> Path:
    """The tokenizer trained on the sample data by data/make_data.py."""
    return TOKENIZER_DIR


@pytest.fixture(scope="session")
def tokenizer_dir(project_tokenizer_dir) -> Path:
    return project_tokenizer_dir
