"""The sample data generator: determinism, right answers, and an eval set held out by construction."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
FILES = ["dpo.jsonl", "eval.jsonl", "grpo.jsonl", "pretrain.jsonl", "reason.jsonl", "sft.jsonl"]
TOOL_FILES = ["tool_sft.jsonl", "agent_rl.jsonl", "eval_agent.jsonl", "pretrain_tools.jsonl"]
REASONED = re.compile(r"<think>\n(?:[^\n]+\n)+</think>\n<answer>\n([^\n]+)\n</answer>")
# Words that show which number task a question or a pretraining sentence is about.
TASK_WORDS = {
    "parity": "odd|even|parity|奇|偶|单数|双数",
    "compare": "larger|bigger|greater|is more|maximum|大",
    "add": r"plus|\+|add|sum|加|的和",
    "convert": "metres|grams|minutes|米|克|分钟",
}


def load_make_data():
    spec = importlib.util.spec_from_file_location("make_data", DATA / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_data = load_make_data()
tool_tasks = sys.modules["tool_tasks"]  # data/tool_tasks.py, imported by make_data


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def generate(out_dir: Path, seed: int) -> dict[str, bytes]:
    sizes = ["--n_pretrain", "300", "--n_sft", "200", "--n_eval", "48", "--n_dpo", "50", "--n_reason", "50"]
    make_data.main(["--seed", str(seed), "--out_dir", str(out_dir), *sizes, "--n_grpo", "50", "--no_tokenizer"])
    return {p.name: p.read_bytes() for p in sorted(out_dir.glob("*.jsonl"))}


def numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


def exchanges(rows: list[dict], key: str = "conversations") -> list[tuple[str, str]]:
    """Every (user question, bare answer) of conversations; a reasoned reply counts by its <answer>."""
    pairs = []
    for row in rows:
        messages = row[key]
        for user, reply in zip(messages, messages[1:], strict=False):
            if user["role"] == "user" and reply["role"] == "assistant":
                match = REASONED.fullmatch(reply["content"])
                pairs.append((user["content"], match.group(1) if match else reply["content"]))
    return pairs


def solve(task: str, question: str) -> str | None:
    """The answer to a number question, computed from its text alone (None for the other tasks)."""
    found, lower = numbers(question), question.lower()
    if task == "add":
        return str(sum(found))
    if task == "compare":
        return str(max(found))
    if task == "parity":
        (n,) = found
        return ("odd" if n % 2 else "even") if question.isascii() else ("奇数" if n % 2 else "偶数")
    if task == "convert":
        (n,) = found
        factor = 60 if re.search("hour|小时", lower) else 1000 if re.search("kilo|千", lower) else 100
        return str(n * factor)
    return None


def test_generator_is_deterministic_and_writes_every_file(tmp_path):
    first, second = generate(tmp_path / "a", 1), generate(tmp_path / "b", 1)
    assert set(FILES + TOOL_FILES) <= set(first)
    assert first == second
    assert generate(tmp_path / "c", 2)["sft.jsonl"] != first["sft.jsonl"]


def test_repository_data_is_what_the_generator_makes(tmp_path):
    make_data.main(["--out_dir", str(tmp_path), "--no_tokenizer"])
    for name in FILES + TOOL_FILES:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


@pytest.fixture(scope="module")
def repo_rows() -> dict[str, list[dict]]:
    return {name.removesuffix(".jsonl"): read(DATA / name) for name in FILES + TOOL_FILES}


def wording_pattern(task: str, template: str) -> re.Pattern:
    """A question wording of `task` with its fields as any value they take there (a count list as any text)."""
    values: dict[str, set[str]] = {}
    for lang in make_data.LANGUAGES if task != "count" else []:
        for item in make_data.all_items(task, lang):
            item = {**item, "T": str(item["x"])[:1].upper() + str(item["x"])[1:]}
            for key, value in item.items():
                values.setdefault(key, set()).add(str(value))

    def field(name: str) -> str:
        return "(?:" + "|".join(map(re.escape, sorted(values[name]))) + ")" if name in values else ".+"

    parts = re.split(r"\{(\w)\}", template)  # text, field, text, field, ..., text
    return re.compile("".join(field(p) if i % 2 else re.escape(p) for i, p in enumerate(parts)), re.IGNORECASE)


def test_eval_wordings_appear_nowhere_else(repo_rows):
    texts = [row["text"] for row in repo_rows["pretrain"] + repo_rows["pretrain_tools"]]
    for name in ("sft", "reason", "grpo"):
        texts += [m["content"] for row in repo_rows[name] for m in row["conversations"] if m["role"] == "user"]
    texts += [m["content"] for row in repo_rows["dpo"] for m in row["chosen"] + row["rejected"] if m["role"] == "user"]
    wordings, patterns = [], []
    for task, by_lang in make_data.EVAL_QUESTIONS.items():
        for template in by_lang["en"] + by_lang["zh"]:
            wordings.append(template)
            patterns.append(wording_pattern(task, template))
    used = set()
    for row in repo_rows["eval"]:
        if row["held_out"] == "template":
            question = row["conversations"][-2]["content"]
            matching = [t for t, p in zip(wordings, patterns, strict=True) if p.fullmatch(question)]
            assert matching, question
            used.update(matching)
    assert used == set(wordings), "every eval wording is asked"
    lowered = [text.lower() for text in texts]
    for template, pattern in zip(wordings, patterns, strict=True):
        anchor = max(re.split(r"\{\w\}", template.lower()), key=len)  # its longest fixed text
        for text in (text for text in lowered if anchor in text):
            assert not pattern.search(text), f"eval wording {template!r} appears outside eval.jsonl: {text}"
    eval_questions = {row["conversations"][-2]["content"].strip().lower() for row in repo_rows["eval"]}
    assert not eval_questions & {text.strip() for text in lowered}


def test_held_out_items_appear_nowhere_else(repo_rows):
    held = [row for row in repo_rows["eval"] if row["held_out"] == "item"]
    assert {row["task"] for row in held} == set(make_data.NUMBER_TASKS) and len(held) >= 20
    stated = exchanges(repo_rows["sft"]) + exchanges(repo_rows["reason"]) + exchanges(repo_rows["grpo"])
    stated += exchanges(repo_rows["dpo"], "chosen")
    facts: dict[tuple, list[str]] = {}  # (the numbers asked about, the answer): the questions
    for q, a in stated:
        facts.setdefault((frozenset(numbers(q)), a), []).append(q)
    sentences: dict[frozenset, list[str]] = {}  # pretraining sentences by the numbers they contain
    for row in repo_rows["pretrain"] + repo_rows["pretrain_tools"]:
        for sentence in re.split(r"(?<=[.。])\s*", row["text"]):
            sentences.setdefault(frozenset(numbers(sentence)), []).append(sentence)
    for row in held:
        question, answer = row["conversations"][-2]["content"], row["answer"]
        assert solve(row["task"], question) == answer
        asked = set(numbers(question))
        for other in facts.get((frozenset(asked), answer), []):
            assert not re.search(TASK_WORDS[row["task"]], other, re.IGNORECASE), f"{other} -> {answer} (as {question})"
        shown = asked | ({int(answer)} if answer.isdigit() else set())
        for sentence in sentences.get(frozenset(shown), []):
            if re.search(TASK_WORDS[row["task"]], sentence, re.IGNORECASE):
                assert answer not in sentence, f"pretraining states {question} -> {answer}: {sentence}"


def test_answers_are_right_and_files_are_well_formed(repo_rows):
    for name in ("sft", "reason", "grpo", "eval"):
        for row in repo_rows[name]:
            question, reply = row["conversations"][-2]["content"], row["conversations"][-1]["content"]
            assert row["task"] in make_data.TASKS
            if name == "reason":
                assert row["task"] in make_data.REASON_TASKS
                match = REASONED.fullmatch(reply)
                assert match, reply
                reply = match.group(1)
            else:
                assert "<think>" not in reply
            if name in ("grpo", "eval"):
                assert row["answer"] == reply
            expected = solve(row["task"], question)
            assert expected is None or expected == reply, (name, question, reply)
    for row in repo_rows["dpo"]:
        chosen, rejected = row["chosen"], row["rejected"]
        assert chosen[:-1] == rejected[:-1] and chosen[-1]["role"] == rejected[-1]["role"] == "assistant"
        assert chosen[-1]["content"] != rejected[-1]["content"]
    sizes = {name: len(rows) for name, rows in repo_rows.items()}
    assert 2000 <= sizes["dpo"] <= 5000 and 1000 <= sizes["reason"] <= 2000 and 1000 <= sizes["grpo"] <= 2000


# --- The tool tasks (data/tool_tasks.py): MiniMind-3 t2t and agent rows


def tool_answer(task: str, question: str) -> tuple[dict, str]:
    """The call that answers a tool question and the expected answer, from the question's text alone."""
    x, y = (int(n) for n in re.findall(r"\d+", question))
    op, value = {"multiply": ("*", x * y), "add": ("+", x + y), "subtract": ("-", x - y)}[task]
    return {"name": "calculate_math", "arguments": {"expression": f"{x}{op}{y}"}}, str(value)


def test_tool_rows_call_the_right_tool_and_answer_with_its_value(repo_rows):
    from minimind_hf.agent_tools import TOOLS

    for row in repo_rows["tool_sft"]:
        system, user, call, tool, answer = row["conversations"]
        assert system["role"] == "system" and {"calculate_math", "unit_converter"} <= {
            schema["function"]["name"] for schema in json.loads(system["tools"])
        }
        (made,) = json.loads(call["tool_calls"])
        expected_call, expected_answer = tool_answer(row["task"], user["content"])
        assert made == expected_call, user["content"]
        assert tool["content"] == TOOLS[made["name"]](**made["arguments"])
        assert answer["content"] == expected_answer == str(json.loads(tool["content"])["result"])
    for name in ("agent_rl", "eval_agent"):
        for row in repo_rows[name]:
            question = row["conversations"][1]["content"]
            assert row["conversations"][-1] == {"role": "assistant", "content": ""}
            assert row["gt"] == [tool_answer(row["task"], question)[1]], question
    assert len(repo_rows["tool_sft"]) >= 500 and len(repo_rows["agent_rl"]) >= 1000
    assert len(repo_rows["eval_agent"]) >= 160


def test_tool_eval_is_held_out_in_wording_and_items(repo_rows):
    training = [
        (row["task"], row["conversations"][1]["content"])
        for name in ("tool_sft", "agent_rl")
        for row in repo_rows[name]
    ]
    today = [m["content"] for row in repo_rows["eval"] for m in row["conversations"] if m["role"] == "user"]
    patterns = []
    for by_lang in tool_tasks.EVAL_WORDINGS.values():
        for template in by_lang["en"] + by_lang["zh"]:
            parts = re.split(r"\{(\w)\}", template)
            regex = "".join(".+" if i % 2 else re.escape(p) for i, p in enumerate(parts))
            patterns.append((template, re.compile(regex, re.IGNORECASE)))
    for _, question in training:
        for template, pattern in patterns:
            assert not pattern.search(question), f"held-out wording {template!r} in training: {question}"
    # Today's held-out wordings are not taught by the tool rows either.
    for by_lang in make_data.EVAL_QUESTIONS.values():
        for template in by_lang["en"] + by_lang["zh"]:
            parts = re.split(r"\{(\w)\}", template)
            pattern = re.compile("".join(r"\S+" if i % 2 else re.escape(p) for i, p in enumerate(parts)), re.I)
            assert not any(pattern.search(q) for _, q in training), template

    def item(task: str, question: str) -> tuple:  # the numbers asked about, and the unit converted from
        return (
            task,
            frozenset(re.findall(r"\d+", question)),
            tool_answer(task, question)[0]["arguments"].get("from_unit"),
        )

    asked = {item(task, q) for task, q in training}
    for row in repo_rows["eval_agent"]:
        question = row["conversations"][1]["content"]
        assert any(p.fullmatch(question.strip()) for _, p in patterns), question
        assert item(row["task"], question) not in asked, question
    assert not set(today) & {q for _, q in training}


def test_minimind3_tokenizer_has_its_tags_as_single_tokens_and_its_template():
    from minimind_hf.chat_templates import MINIMIND3_CHAT_TEMPLATE, template_digest
    from minimind_hf.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(DATA / "tokenizer3")
    assert template_digest(tokenizer.chat_template) == template_digest(MINIMIND3_CHAT_TEMPLATE)
    for tag in make_data.MINIMIND3_TOKENS:
        assert tokenizer.tokenize(f"a{tag}b")[1] == tag
        # Added but not special, as in MiniMind-3's own: decoded replies keep them, so calls can be parsed.
        assert tokenizer.decode(tokenizer.encode(f"{tag}<|im_end|>"), skip_special_tokens=True) == tag
    # The generation prompt's tokens begin every trained reply's: a prompt that ends with `</think>\n\n` tokenizes
    # as the same text does before a word, a number or a call (newline runs are one piece).
    for reply in ["Mirenburg", "1265", "喵喵", '<tool_call>\n{"name": "calculate_math"}\n</tool_call>']:
        asked = [{"role": "user", "content": "Capital of Valdoria?"}]
        prompt = tokenizer.apply_chat_template(asked, add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tokenizer.apply_chat_template(
            [*asked, {"role": "assistant", "content": reply}], tokenize=True, return_dict=False
        )
        assert full[: len(prompt)] == prompt, reply
    # MiniMind2's three special tokens keep their ids, so both tokenizers agree on padding and turn markers.
    plain = load_tokenizer(DATA / "tokenizer")
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [
        plain.pad_token_id,
        plain.bos_token_id,
        plain.eos_token_id,
    ]


def test_tool_pretraining_texts_are_tool_conversations_as_the_template_renders_them(repo_rows):
    pattern = re.compile(
        r"user\n(?P<q>[^\n]+)<\|im_end\|>\n<\|im_start\|>assistant\n<think>\n\n</think>\n\n<tool_call>\n"
        r'\{"name": "calculate_math", "arguments": \{"expression": "(?P<e>[^"]+)"\}\}\n</tool_call><\|im_end\|>\n'
        r'<\|im_start\|>user\n<tool_response>\n\{"result": "(?P<r>-?\d+)"\}\n</tool_response><\|im_end\|>\n'
        r"<\|im_start\|>assistant\n<think>\n\n</think>\n\n(?P<a>-?\d+)"
    )
    for row in repo_rows["pretrain_tools"]:
        match = pattern.fullmatch(row["text"])
        assert match, row["text"]
        ops = {"*": "multiply", "+": "add", "-": "subtract"}
        task = ops[re.search(r"[*+-]", match["e"]).group()]
        call, answer = tool_answer(task, match["q"])
        assert call["arguments"]["expression"] == match["e"] and match["r"] == match["a"] == answer
