"""camelid chat [--model M]: interactive multi-turn chat with the model's template (/reset, /exit)."""

from __future__ import annotations

import sys

from camelid.commands.common import load_model_and_tokenizer, sampling, sampling_args

HELP = "interactive multi-turn chat with the model's template"


def add_arguments(p) -> None:
    sampling_args(p)


def main(args) -> int:
    from camelid.generation.generate import generate

    model, tokenizer = load_model_and_tokenizer(args)
    if not tokenizer.chat_template:
        raise ValueError("this model has no chat template; use `camelid generate --raw`")
    history: list[dict] = []
    print("camelid chat: type a message; /reset clears the history, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        result = generate(model, tokenizer, [history], chat=True, max_new_tokens=args.max_new_tokens,
                          stop=args.stop, on_text=lambda row, d: (sys.stdout.write(d), sys.stdout.flush()),
                          **sampling(args))[0]
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": result.text})
    return 0
