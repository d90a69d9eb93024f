"""`jupyter-llm`: the same library without a notebook.

    jupyter-llm generate "The capital of France is" --max-tokens 16 --temperature 0
    jupyter-llm generate --chat "What is the capital of France?" --backend hf
    jupyter-llm generate "A person as JSON:" --json-schema person.json
    jupyter-llm generate "Is the sky blue?" --choice yes no
    jupyter-llm backends
    jupyter-llm serve --backend native --model smollm2-135m --port 8000 --max-num-seqs 64
    jupyter-llm build-llamacpp --rebuild

Backend options go where a backend loads (generate, serve, bench --load) as in `%llm_backend`:
`--key value` for any option the command does not define itself, `--backend-option key=value` always.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jupyter_llm.argtable import BACKEND_OPTIONS, SAMPLING, backend_options, params_from_args, split_backend_words
from jupyter_llm.bench.command import BENCH
from jupyter_llm.errors import ParamError, UserError
from jupyter_llm.llamacpp_build import add_arguments as add_llamacpp_build_arguments
from jupyter_llm.llamacpp_build import run_from_args as build_llamacpp
from jupyter_llm.server.settings import SERVE
from jupyter_llm.structured_options import STRUCTURED, structured_from_args

LOADING = ("generate", "serve", "bench")  # the commands that load a backend, and so take its options


def _options(args: argparse.Namespace) -> dict[str, object]:
    """The backend options of a loading command: free words, --backend-option items, --threads."""
    options = backend_options(args.backend_words, args.backend_option)
    if getattr(args, "threads", None):
        options["threads"] = args.threads
    return options


def _generate(args: argparse.Namespace) -> int:
    from jupyter_llm.manager import get_manager
    from jupyter_llm.views import summary_line

    params = params_from_args(args, max_tokens=256, temperature=0.7)  # refuse bad options before loading
    params = params.replace(structured=structured_from_args(args))
    manager = get_manager()
    options = _options(args)
    if args.backend:
        manager.load(args.backend, args.model, **options)
    elif args.model:
        manager.load("hf", args.model, **options)
    else:
        manager.load_default(**options)
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


def _bench(args: argparse.Namespace) -> int:
    from jupyter_llm.bench.command import run_from_args
    from jupyter_llm.manager import get_manager

    manager = get_manager()
    options = _options(args)
    if options and not args.load and (args.url or args.backends):
        raise ParamError(f"backend options {sorted(options)} apply to the backends bench loads: add --load KINDS")
    for kind in [k.strip() for k in (args.load or "").split(",") if k.strip()]:
        manager.load(kind, args.load_model, progress=False, **options)
    if not args.load and not args.url and not args.backends:
        manager.load_default(progress=False, **options)
    result, _ = run_from_args(args, manager)
    print(result.table()["text/plain"])
    if args.save:
        print(f"saved {args.save}" + ("" if args.no_plot else f" and {args.save.rsplit('.', 1)[0]}.png"))
    return 0 if not any(row["errors"] for row in result.rows) else 1


def _backends(args: argparse.Namespace) -> int:
    from jupyter_llm.backends import available_backends

    for b in available_backends():
        print(f"{b.kind:10} {'yes' if b.available else 'no ':4} {b.reason or b.description}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from jupyter_llm.manager import get_manager
    from jupyter_llm.server.launcher import banner, serve_forever
    from jupyter_llm.server.settings import key_hint, settings_from_args

    settings = settings_from_args(args)  # refuse bad options before loading a model
    options = _options(args)
    manager = get_manager()
    if args.backend or args.model:
        manager.load(args.backend or "hf", args.model, name=args.name, **options)
    else:
        manager.load_default(**options)
    if settings.warning:
        print(f"jupyter-llm: warning: {settings.warning}", file=sys.stderr)

    def ready(url: str) -> None:
        print(banner(url, manager.names(), manager.default, key_hint(args), "Stop it with Ctrl-C."), flush=True)

    serve_forever(manager, settings, ready)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jupyter-llm", description="LLM inference from the command line")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="stream a completion to the terminal")
    gen.add_argument("prompt", nargs="*", help="prompt(s); none: read standard input")
    gen.add_argument("--backend", help="backend kind (default: the best one for the embedded model)")
    gen.add_argument("--model", help="model alias, folder, .gguf file or hub id (default: smollm2-135m)")
    gen.add_argument("--threads", type=int, help="backend compute threads (a backend option)")
    gen.add_argument("--chat", action="store_true")
    gen.add_argument("--system")
    SAMPLING.add_to(gen)
    STRUCTURED.add_to(gen)
    BACKEND_OPTIONS.add_to(gen)
    gen.set_defaults(func=_generate)
    bench = commands.add_parser("bench", help="benchmark backends and OpenAI-compatible servers")
    bench.add_argument("--load", metavar="KINDS", help="backend kinds to load first, comma-separated (e.g. native,hf)")
    bench.add_argument("--load-model", metavar="MODEL", help="model for --load (default: smollm2-135m)")
    BENCH.add_to(bench)
    BACKEND_OPTIONS.add_to(bench)  # for --load: --url, --model and --api-key are the bench's own
    bench.set_defaults(func=_bench)
    commands.add_parser("backends", help="list backends and whether each can load here").set_defaults(func=_backends)
    serve = commands.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API (until Ctrl-C)")
    serve.add_argument("--backend", help="backend kind (default: the best one for the embedded model)")
    serve.add_argument("--model", help="model alias, folder, .gguf file or hub id (default: smollm2-135m)")
    serve.add_argument("--name", help="the model's name in the API (default: the backend kind)")
    serve.add_argument("--threads", type=int, help="backend compute threads (a backend option)")
    BACKEND_OPTIONS.add_to(serve)  # the openai backend's key: --backend-option api_key=... (--api-key is ours)
    SERVE.add_to(serve)
    serve.set_defaults(func=_serve)
    build = commands.add_parser("build-llamacpp", help="compile llama-cpp-python for this CPU's instruction sets "
                                "(never -march=native, never AMX) and install it here")
    add_llamacpp_build_arguments(build)
    build.set_defaults(func=build_llamacpp)
    return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with a loading command's unknown --key value words kept apart as
    `backend_words` (split before argparse, which would take their values for prompts)."""
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((i for i, w in enumerate(words) if not w.startswith("-")), None)
    backend: list[str] = []
    if command is not None and words[command] in LOADING:
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        own, backend = split_backend_words(words[command + 1:], commands.choices[words[command]])
        words = words[:command + 1] + own
    args = parser.parse_args(words)
    args.backend_words = backend
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    try:
        return args.func(args)
    except UserError as error:
        print(f"jupyter-llm: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
