"""camelid export MODEL OUT --format onnx|torch-export: the prefill/decode graph with the KV cache
as inputs and outputs, as ONNX or a torch.export .pt2."""

from __future__ import annotations

HELP = "write the model as a static graph (KV cache as inputs/outputs): ONNX or .pt2"


def add_arguments(p) -> None:
    p.add_argument("model", help="model name or path")
    p.add_argument("out", help="output file: .onnx (--format onnx) or .pt2 (--format torch-export)")
    p.add_argument("--format", default="onnx", help="onnx (default) | torch-export")


def main(args) -> int:
    from camelid.export import check_output, export
    from camelid.load import load

    check_output(args.out, args.format)  # before loading the model
    model = load(args.model, pack=False)  # plain nn.Linear weights: what exporters trace
    print(f"{args.model} -> {export(model, args.out, format=args.format)} ({args.format})")
    return 0
