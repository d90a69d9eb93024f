"""`jupyter-llm`: the same library without a notebook.

    jupyter-llm generate "The capital of France is" --max-tokens 16 --temperature 0
    jupyter-llm generate --chat "What is the capital of France?" --backend hf
    jupyter-llm backends
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .arguments import add_sampling_arguments, params_from_args


def _generate(args: argparse.Namespace) -> int:
    from .manager import get_manager
    from .render import summary_line

    manager = get_manager()
    options = {"threads": args.threads} if args.threads else {}
    if args.backend:
        manager.load(args.backend, args.model, **options)
    elif args.model:
        manager.load("hf", args.model, **options)
    else:
        manager.load_default()
    params = params_from_args(args, max_tokens=256, temperature=0.7)
    prompts = args.prompt or [sys.stdin.read()]
    chat = args.chat or bool(args.system)
    stream = manager.stream(prompts if len(prompts) > 1 else prompts[0], params, chat=chat, system=args.system)
    many = len(prompts) * params.n > 1
    try:
        for event in stream:
            if many:  # several outputs interleave: print each when it is complete
                continue
            sys.stdout.write(event.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.cancel()
    if many:
        for c in stream.completions:
            print(f"--- prompt {c.prompt_index}, sample {c.index} ---\n{c.text}")
    else:
        print()
    print(summary_line(stream.completions), file=sys.stderr)
    return 0 if all(c.finish_reason != "error" for c in stream.completions) else 1


def _backends(args: argparse.Namespace) -> int:
    from .backends import available_backends

    for b in available_backends():
        print(f"{b.kind:10} {'yes' if b.available else 'no ':4} {b.reason or b.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jupyter-llm", description="LLM inference from the command line")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="stream a completion to the terminal")
    gen.add_argument("prompt", nargs="*", help="prompt(s); none: read standard input")
    gen.add_argument("--backend", help="backend kind (default: the best one for the embedded model)")
    gen.add_argument("--model", help="model alias, folder, .gguf file or hub id (default: smollm2-135m)")
    gen.add_argument("--threads", type=int)
    gen.add_argument("--chat", action="store_true")
    gen.add_argument("--system")
    add_sampling_arguments(gen)
    gen.set_defaults(func=_generate)
    commands.add_parser("backends", help="list backends and whether each can load here").set_defaults(func=_backends)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .backends.base import BackendError
    from .manager import QueueFullError
    from .models import ModelNotFound
    from .params import ParamError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ParamError, BackendError, ModelNotFound, QueueFullError) as error:
        print(f"jupyter-llm: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
