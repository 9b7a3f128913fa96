"""Shared test setup: offline hubs, no swanlab network, and the reference fixtures of the original code."""

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SWANLAB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"


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
    return REPO_ROOT / "data" / "tokenizer"


@pytest.fixture(scope="session")
def tokenizer_dir(project_tokenizer_dir) -> Path:
    return project_tokenizer_dir


def write_tiny_recipe(directory: Path, **overrides) -> Path:
    """`directory/recipe.yaml`: a 2-layer, 32-wide SFT recipe on `directory/sft.jsonl` that trains in seconds."""
    recipe = {
        "data_path": str(directory / "sft.jsonl"),
        "tokenizer_name_or_path": str(REPO_ROOT / "data" / "tokenizer"),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "config_overrides": "num_attention_heads=4,num_key_value_heads=2",
        "output_dir": str(directory / "out"),
        "per_device_train_batch_size": 4,
        "max_length": 64,
        "max_steps": 2,
        "save_steps": 2,
        "learning_rate": 1e-3,
        "bf16": False,
        "report_to": "none",
        "dataloader_num_workers": 0,
        **overrides,
    }
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
