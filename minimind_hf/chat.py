"""Chat with a MiniMind model: an HF directory, or an original MiniMind `.pth` with its sizes.

    python -m minimind_hf.chat --model out/sft                       # interactive, streamed, multi-turn
    python -m minimind_hf.chat --model out/sft --prompt "Hi" --prompt "2+2?" --greedy   # one-shot answers
    python -m minimind_hf.chat --model out/full_sft_512.pth --tokenizer data/tokenizer --hidden_size 512

Prompts are rendered with the tokenizer's chat template (generation prompt added) and generation stops at
`<|im_end|>`. In the interactive mode `/clear` forgets the history and `/exit` (or Ctrl-D) quits.
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextStreamer, set_seed

from .cli_options import (
    add_model_arguments,
    device_problem,
    load_from_args,
    non_negative_float,
    non_negative_int,
    positive_int,
    probability,
    seed,
)
from .configuration_minimind import config_overrides_problem
from .loading import DTYPES, load_model_and_tokenizer
from .replies import split_reply
from .tokenizer import EOS_TOKEN

__all__ = [
    "DTYPES",
    "add_model_arguments",
    "generate_replies",
    "generate_reply",
    "load_from_args",
    "load_model_and_tokenizer",
]


def build_messages(
    history: list[tuple[str, str]], prompt: str, system: str | None = None, max_turns: int = 0
) -> list[dict[str, str]]:
    """The conversation to answer: the optional system prompt, the last `max_turns` (user, assistant) turns of
    `history`, then `prompt`."""
    messages = [{"role": "system", "content": system}] if system else []
    kept = history[-max_turns:] if max_turns > 0 else []  # history[-0:] would keep everything
    for user, assistant in kept:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return [*messages, {"role": "user", "content": prompt}]


def generate_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    *,
    max_new_tokens: int = 512,
    temperature: float = 0.85,
    top_p: float = 0.85,
    greedy: bool = False,
    streamer: TextStreamer | None = None,
    template_kwargs: dict | None = None,
) -> list[str]:
    """The assistant's next message for each conversation, generated as one left-padded batch.

    `template_kwargs` reach the chat template (MiniMind-3: `{"open_thinking": True}` opens a think block, and the
    reply then starts with the reasoning, up to `</think>`)."""
    inputs = tokenizer.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        **(template_kwargs or {}),
        padding=True,
        return_tensors="pt",
        return_dict=True,
        tokenizer_kwargs={"padding_side": "left"},
    ).to(model.device)
    # Set every sampling field, so that a checkpoint's own generation config cannot half-apply (e.g. its
    # temperature on a greedy run).
    sampling = {"do_sample": not greedy, "temperature": temperature, "top_p": top_p, "top_k": None}
    if greedy:
        sampling.update(temperature=None, top_p=None)
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
            **sampling,
        )
    return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def generate_reply(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], **sampling
) -> str:
    """The assistant's next message after `messages`; `sampling` as in `generate_replies` (`streamer` too)."""
    return generate_replies(model, tokenizer, [messages], **sampling)[0]


def _not_utf8(text: str) -> bool:
    """Whether `text` came from bytes that are not UTF-8 (decoded with surrogateescape, as argv is)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _chat(model, tokenizer, args: argparse.Namespace, sampling: dict) -> None:
    history: list[tuple[str, str]] = []
    print(f"Chatting with {args.model}: /clear forgets the history, /exit or Ctrl-D quits.")
    # Strict decoding would raise on the first byte that is not UTF-8 and end the session with its history:
    # escaped, such a line is refused below and the session goes on.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            prompt = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if prompt == "/exit":
            return
        if prompt == "/clear":
            history.clear()
            continue
        if _not_utf8(prompt):
            print("error: that line is not valid UTF-8 (check the terminal's encoding); type it again", file=sys.stderr)
            continue
        if prompt:
            messages = build_messages(history, prompt, args.system, args.history)
            try:
                reply = generate_reply(model, tokenizer, messages, streamer=_streamer(tokenizer), **sampling)
            except KeyboardInterrupt:  # Ctrl-C stops the reply, not the session
                print("\n(reply interrupted; not kept in the history)")
                continue
            # The next turn's context holds the answer, not the reasoning (as MiniMind-3's template renders it).
            history.append((prompt, split_reply(reply, thinking_open=args.open_thinking, tools=False).content))


def _streamer(tokenizer: PreTrainedTokenizerBase) -> TextStreamer:
    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minimind_hf.chat", description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", help="answer this and exit (repeat for several prompts)")
    parser.add_argument("--system", help="system prompt (default: the chat template's)")
    parser.add_argument(
        "--history", type=non_negative_int, default=4, help="previous turns kept in the context (default 4)"
    )
    parser.add_argument("--max_new_tokens", type=positive_int, default=512)
    parser.add_argument("--temperature", type=non_negative_float, default=0.85, help="0 decodes greedily")
    parser.add_argument("--top_p", type=probability, default=0.85)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--seed", type=seed, help="seed for reproducible sampling")
    parser.add_argument(
        "--open_thinking",
        action="store_true",
        help="MiniMind-3: open a think block, so the model reasons before it answers (its template's open_thinking)",
    )
    args = parser.parse_args(argv)
    # As in most sampling APIs; transformers itself rejects a temperature of 0.
    args.greedy = args.greedy or args.temperature == 0
    for text, flag in [(p, "--prompt") for p in args.prompt or ()] + [(args.system or "", "--system")]:
        if _not_utf8(text):
            parser.error(f"{flag} {text.encode('utf-8', 'surrogateescape')!r} is not valid UTF-8")
    if problem := device_problem(args.device) or config_overrides_problem(args.config_overrides):
        parser.error(problem)

    model, tokenizer = load_from_args(args, parser)
    if args.seed is not None:
        set_seed(args.seed)
    sampling = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_p", "greedy")}
    if args.open_thinking:
        sampling["template_kwargs"] = {"open_thinking": True}
    if not args.prompt:
        _chat(model, tokenizer, args, sampling)
        return
    for prompt in args.prompt:
        if len(args.prompt) > 1:
            print(f"> {prompt}")
        messages = build_messages([], prompt, args.system)
        generate_reply(model, tokenizer, messages, streamer=_streamer(tokenizer), **sampling)


if __name__ == "__main__":
    main()
