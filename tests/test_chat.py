"""The chat command on a tiny random model: one-shot answers, history, interactive loop and model sources."""

import io
from pathlib import Path

import pytest
import torch

from minimind_hf import MiniMindConfig, MiniMindForCausalLM
from minimind_hf import chat as chat_module
from minimind_hf.chat import build_messages, generate_replies, generate_reply, load_model_and_tokenizer, main
from minimind_hf.formats.pth import save_pth
from minimind_hf.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
PTH_ARGS = ["--hidden_size", "32", "--num_hidden_layers", "2", "--config_overrides", "num_attention_heads=4"]
PROMPTS = ["A duck goes what?", "煤通常是什么颜色？", "hello there, how are you doing today?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir) -> dict:
    """A tiny model (weights rounded to fp16, so its .pth twin is the same model) as an HF dir and a .pth."""
    torch.manual_seed(0)
    # A wide initialisation, so that the greedy replies of a random model differ from prompt to prompt.
    model = MiniMindForCausalLM(MiniMindConfig(**SIZES, initializer_range=0.2)).half().float().eval()
    root = tmp_path_factory.mktemp("tiny_chat")
    model.save_pretrained(root / "hf")
    load_tokenizer(tokenizer_dir).save_pretrained(root / "hf")
    save_pth(model, root / "tiny.pth")
    return {"dir": root / "hf", "pth": root / "tiny.pth", "tokenizer": tokenizer_dir}


def test_one_shot_prints_the_greedy_reply_and_returns(tiny, capsys):
    main(["--model", str(tiny["dir"]), "--prompt", PROMPTS[0], "--greedy", "--max_new_tokens", "12"])
    printed = capsys.readouterr().out
    model, tokenizer = load_model_and_tokenizer(tiny["dir"])
    reply = generate_reply(model, tokenizer, build_messages([], PROMPTS[0]), greedy=True, max_new_tokens=12)
    assert reply.strip(), "the random model should say something"
    assert printed == reply + "\n"


def test_several_prompts_are_answered_independently(tiny, capsys):
    argv = ["--model", str(tiny["dir"]), "--greedy", "--max_new_tokens", "8"]
    main([*argv, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]])
    both = capsys.readouterr().out
    main([*argv, "--prompt", PROMPTS[1]])
    alone = capsys.readouterr().out
    assert both.startswith(f"> {PROMPTS[0]}\n")
    assert both.endswith(f"> {PROMPTS[1]}\n{alone}"), "the second prompt must not see the first as history"


def test_batched_left_padded_generation_matches_one_at_a_time(tiny):
    model, tokenizer = load_model_and_tokenizer(tiny["dir"])
    conversations = [build_messages([], prompt) for prompt in PROMPTS]
    batched = generate_replies(model, tokenizer, conversations, greedy=True, max_new_tokens=10)
    single = [generate_reply(model, tokenizer, c, greedy=True, max_new_tokens=10) for c in conversations]
    assert batched == single
    assert len(set(batched)) == len(PROMPTS)


def test_sampling_is_reproducible_with_a_seed(tiny, capsys):
    argv = ["--model", str(tiny["dir"]), "--prompt", PROMPTS[2], "--max_new_tokens", "16", "--temperature", "1.5"]
    outputs = []
    for seed in ("1", "1", "2"):
        main([*argv, "--seed", seed])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]


def test_build_messages_keeps_the_last_n_turns_after_the_system_prompt():
    history = [(f"q{i}", f"a{i}") for i in range(5)]
    messages = build_messages(history, "now?", system="Be brief.", max_turns=2)
    assert [(m["role"], m["content"]) for m in messages] == [
        ("system", "Be brief."),
        ("user", "q3"),
        ("assistant", "a3"),
        ("user", "q4"),
        ("assistant", "a4"),
        ("user", "now?"),
    ]
    assert build_messages(history, "now?", max_turns=0) == [{"role": "user", "content": "now?"}]
    assert len(build_messages(history, "now?", max_turns=50)) == 11


def test_interactive_loop_carries_history_clears_it_and_exits(tiny, monkeypatch):
    seen = []

    def fake_reply(model, tokenizer, messages, streamer=None, **sampling):
        seen.append([m["content"] for m in messages])
        return f"reply{len(seen)}"

    monkeypatch.setattr(chat_module, "generate_reply", fake_reply)
    # An empty line is ignored, /clear forgets the history, /exit quits before q5.
    monkeypatch.setattr("sys.stdin", io.StringIO("q1\nq2\n\nq3\n/clear\nq4\n/exit\nq5\n"))
    main(["--model", str(tiny["dir"]), "--history", "1", "--system", "S"])
    assert seen == [["S", "q1"], ["S", "q1", "reply1", "q2"], ["S", "q2", "reply2", "q3"], ["S", "q4"]]


def test_pth_with_sizes_gives_the_same_replies_as_the_hf_directory(tiny, capsys):
    argv = ["--prompt", PROMPTS[1], "--greedy", "--max_new_tokens", "12"]
    main(["--model", str(tiny["dir"]), *argv])
    from_dir = capsys.readouterr().out
    main(["--model", str(tiny["pth"]), "--tokenizer", str(tiny["tokenizer"]), *PTH_ARGS, *argv])
    assert capsys.readouterr().out == from_dir


def test_bfloat16_model_is_the_float32_one_rounded(tiny):
    model, tokenizer = load_model_and_tokenizer(tiny["dir"], dtype="bfloat16")
    full, _ = load_model_and_tokenizer(tiny["dir"])
    assert model.dtype == torch.bfloat16
    assert all(torch.equal(p, q.to(torch.bfloat16)) for p, q in zip(model.parameters(), full.parameters(), strict=True))
    ids = tokenizer.apply_chat_template(
        build_messages([], PROMPTS[0]), add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        low, high = model(ids).logits.float(), full(ids).logits
    # bfloat16 keeps 8 bits of mantissa: the logits agree to a few percent of their range (measured: 2%).
    assert (low - high).abs().max() <= 0.05 * high.abs().max()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "no/such/model"], "no/such/model: no such model"),
        (["--model", "{pth}", *PTH_ARGS], "a .pth carries no tokenizer; pass --tokenizer"),
        (["--model", "{pth}", "--tokenizer", "{tokenizer}"], "keys do not match a MiniMind model with hidden_size=512"),
    ],
)
def test_bad_model_source_is_a_clear_error(tiny, capsys, argv, message):
    argv = [a.format(pth=tiny["pth"], tokenizer=tiny["tokenizer"]) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--prompt", "hi"])
    assert exit_info.value.code == 1
    assert message in capsys.readouterr().err


def test_minimind3_chat_opens_a_think_block_on_request(shared_fixtures, tmp_path, capsys):
    """A MiniMind-3 directory chats through its own template: `--open_thinking` ends the prompt inside `<think>`,
    and the history keeps only the answer after `</think>`."""
    from minimind_hf import MiniMind3Config, MiniMind3ForCausalLM

    tokenizer = load_tokenizer(shared_fixtures / "minimind3_reference" / "tokenizer")
    torch.manual_seed(0)
    config = MiniMind3Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5
    )
    MiniMind3ForCausalLM(config).save_pretrained(tmp_path / "m3")
    tokenizer.save_pretrained(tmp_path / "m3")
    model, tokenizer = load_model_and_tokenizer(tmp_path / "m3")
    question = [{"role": "user", "content": "hi"}]
    open_prompt = tokenizer.apply_chat_template(
        question, add_generation_prompt=True, tokenize=False, open_thinking=True
    )
    closed_prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    assert open_prompt.endswith("<think>\n") and closed_prompt.endswith("</think>\n\n")
    replies = [
        generate_reply(model, tokenizer, question, greedy=True, max_new_tokens=6, template_kwargs=kwargs)
        for kwargs in ({"open_thinking": True}, None)
    ]
    assert replies[0] != replies[1], "the think block must change the prompt the model continues"
    main(["--model", str(tmp_path / "m3"), "--greedy", "--max_new_tokens", "6", "--open_thinking", "--prompt", "hi"])
    assert capsys.readouterr().out.strip() == replies[0].strip()
