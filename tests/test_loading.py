"""One loader for every form in which MiniMind checkpoints circulate: this project's HF directory, the original's own
HF export, its Llama export and a `.pth` with its sizes. Recipes, `chat` and `evaluate` all take each of them, and a
Llama directory that MiniMind cannot represent is refused with a message naming the field."""

import json

import pytest
import torch

from minimind_hf import chat, evaluate
from minimind_hf.errors import RecipeError
from minimind_hf.loading import load_model
from minimind_hf.stages import sft
from minimind_hf.testing import (
    TOKENIZER_DIR,
    final_weights,
    logits,
    save_in_every_form,
    save_llama_export,
    tiny_model,
    write_jsonl,
    write_sft_data,
    write_tiny_recipe,
)

pytestmark = pytest.mark.usefixtures("datasets_cache")

FORMS = ["hf", "original", "llama", "pth"]
PTH_RECIPE = {"hidden_size": 32, "num_hidden_layers": 2, "config_overrides": "num_attention_heads=4"}
PTH_ARGS = ["--hidden_size", "32", "--num_hidden_layers", "2", "--config_overrides", "num_attention_heads=4"]


@pytest.fixture(scope="module")
def forms(tmp_path_factory) -> dict:
    """One tiny model (float16-exact weights, so that every form holds it exactly) saved in every form."""
    # A wide initialisation, so that the random model's greedy replies are not empty.
    model = tiny_model(initializer_range=0.2)
    return {"model": model, **save_in_every_form(model, tmp_path_factory.mktemp("forms"))}


def test_the_original_export_is_what_the_original_writes(forms):
    """The fixture is faithful: the original's field names, its code by reference, float16 with both tied names."""
    export = forms["original"]
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "minimind" and config["flash_attn"] is True and "rope_theta" in config
    assert config["auto_map"]["AutoModelForCausalLM"] == "model_minimind.MiniMindForCausalLM"
    assert config["torch_dtype"] == "float16" and config["transformers_version"].startswith("4.")
    state = torch.load(export / "pytorch_model.bin", weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.float16}
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])


@pytest.mark.parametrize("form", FORMS)
def test_every_form_loads_as_the_same_model(forms, form):
    sizes = dict(hidden_size=32, num_hidden_layers=2, config_overrides="num_attention_heads=4") if form == "pth" else {}
    model = load_model(forms[form], **sizes)
    assert model.dtype == torch.float32 and not model.config.use_moe
    expected = forms["model"].state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    # The original's `model_minimind.py` (here: code that raises) is never executed.


@pytest.mark.parametrize("form", FORMS)
def test_a_recipe_with_zero_learning_rate_hands_back_the_input_model(forms, tmp_path, form):
    write_sft_data(tmp_path / "sft.jsonl")
    sizes = PTH_RECIPE if form == "pth" else {"hidden_size": None, "num_hidden_layers": None, "config_overrides": ""}
    recipe = write_tiny_recipe(tmp_path, model_name_or_path=str(forms[form]), learning_rate=0.0, **sizes)
    sft.main(["--config", str(recipe)])
    out = load_model(tmp_path / "out")
    expected = forms["model"].state_dict()
    assert all(torch.equal(final_weights(tmp_path / "out")[k], expected[k]) for k in final_weights(tmp_path / "out"))
    ids = torch.randint(3, 2000, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(out, ids), logits(forms["model"], ids))


def untie(state: dict) -> None:
    state["lm_head.weight"] = state["lm_head.weight"] + 0.5


REFUSED_LLAMA = {
    "attention bias": ({"attention_bias": True}, r"attention_bias cannot be represented by MiniMind"),
    "MLP bias": ({"mlp_bias": True}, r"mlp_bias cannot be represented by MiniMind"),
    "another activation": ({"hidden_act": "gelu"}, r"hidden_act cannot be represented by MiniMind .*not 'gelu'"),
    "rope scaling": (
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}},
        r"rope_parameters.rope_type cannot be represented by MiniMind .*'linear'",
    ),
    "untied different head": (
        {"tie_word_embeddings": False, "edit_state": untie},
        r"tie_word_embeddings is false and lm_head.weight differs from the embedding",
    ),
    "other head size": ({"head_dim": 16}, r"head_dim cannot be represented by MiniMind"),
}


@pytest.mark.parametrize("case", REFUSED_LLAMA)
def test_a_llama_directory_minimind_cannot_represent_is_refused_naming_the_field(forms, tmp_path, case):
    changes, message = REFUSED_LLAMA[case]
    llama = save_llama_export(forms["model"], tmp_path / "llama", **changes)
    with pytest.raises(ValueError, match=message):
        load_model(llama)
    write_sft_data(tmp_path / "sft.jsonl")
    with pytest.raises(RecipeError, match=message):
        sft.main(["--config", str(write_tiny_recipe(tmp_path, model_name_or_path=str(llama)))])
    assert not (tmp_path / "out").exists(), "nothing is written for a model that cannot load"


def form_args(forms: dict, form: str) -> list[str]:
    extra = [*PTH_ARGS, "--tokenizer", str(TOKENIZER_DIR)] if form == "pth" else []
    return ["--model", str(forms[form]), *extra]


def test_chat_and_evaluate_take_every_form(forms, tmp_path, capsys):
    rows = [
        {"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "task": t, "answer": a}
        for q, a, t in [("Is 7 odd or even?", "odd", "parity"), ("What colour is coal?", "black", "colour")]
    ]
    data = write_jsonl(tmp_path / "eval.jsonl", rows)
    replies, losses = {}, {}
    for form in FORMS:
        capsys.readouterr()
        chat.main([*form_args(forms, form), "--prompt", "A duck goes what?", "--greedy", "--max_new_tokens", "6"])
        replies[form] = capsys.readouterr().out
        losses[form] = evaluate.main([*form_args(forms, form), "--data", str(data), "--max_new_tokens", "4"])
    model, tokenizer = chat.load_model_and_tokenizer(forms["hf"])
    expected = chat.generate_reply(model, tokenizer, [{"role": "user", "content": "A duck goes what?"}], greedy=True,
                                   max_new_tokens=6)  # fmt: skip
    assert expected.strip() and all(reply == expected + "\n" for reply in replies.values()), replies
    assert all(
        results["mean_loss"] == pytest.approx(losses["hf"]["mean_loss"], abs=1e-6) for results in losses.values()
    )
