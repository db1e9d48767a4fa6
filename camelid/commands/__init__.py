"""The `camelid` programs, one module each. Every module has HELP (the line `camelid --help`
shows), add_arguments(parser) and main(args) -> exit code; camelid/cli.py is the table of them.
Heavy imports (torch, the loader, tokenizers) wait inside main, so `camelid --help` stays fast.
Shared flags and the model + tokenizer loading are in common.py."""
