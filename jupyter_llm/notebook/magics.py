"""The IPython magics: parse arguments, call the manager, render. Thin on purpose:
everything here is also possible from Python (`jupyter_llm.get_manager()`) and the CLI."""
from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments
from traitlets import Bool, Float, Int, Unicode
from traitlets.config import Configurable

from jupyter_llm.argtable import BACKEND_OPTIONS, SAMPLING, backend_options, params_from_args, split_backend_words
from jupyter_llm.bench.command import BENCH
from jupyter_llm.errors import ParamError, UserError
from jupyter_llm.notebook.display import FORMATS, default_format
from jupyter_llm.notebook.interpolate import interpolate, whole_variable
from jupyter_llm.schema import SamplingParams
from jupyter_llm.server.settings import SERVE
from jupyter_llm.structured_options import STRUCTURED, structured_from_args

_SEPARATOR = re.compile(r"^---\s*$", re.MULTILINE)


def _words(line: str) -> list[str]:
    """A magic line split with shell quoting (IPython's own splitter keeps the quotes)."""
    try:
        return shlex.split(line)
    except ValueError as error:
        raise UsageError(f"cannot parse the magic line: {error}") from None


def _parse(magic: Any, line: str) -> Any:
    return magic.parser.parse_args(_words(line))


@contextmanager
def _user_errors() -> Iterator[None]:
    """The user's errors as UsageError: IPython prints one line, no traceback."""
    try:
        yield
    except UserError as error:
        raise UsageError(str(error)) from None


@magics_class
class LLMMagics(Magics, Configurable):
    """%llm_backend and %%generate. Defaults are configurable: %config LLMMagics.max_tokens = 256"""

    default_backend = Unicode("", help="backend name %%generate uses when --backend is not given "
                                       "(empty: the manager's default, the latest loaded)").tag(config=True)
    max_tokens = Int(256, help="default --max-tokens").tag(config=True)
    temperature = Float(0.7, help="default --temperature").tag(config=True)
    stream = Bool(True, help="stream tokens into the cell as they arrive").tag(config=True)
    chat = Bool(False, help="send cells as chat messages by default").tag(config=True)
    system = Unicode("", help="default system prompt for chat").tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any):
        Configurable.__init__(self, config=shell.config if shell is not None else None)
        Magics.__init__(self, shell=shell, **kwargs)

    @property
    def manager(self):
        from jupyter_llm.manager import get_manager

        return get_manager()

    # --- %llm_backend -----------------------------------------------------------------
    @magic_arguments()
    @argument("backend", nargs="?", help="backend kind to load: hf, native, ... (none: show the table)")
    @argument("model", nargs="?", help="model alias, folder, .gguf file or hub id (default: smollm2-135m)")
    @argument("--name", help="name to load it under (default: the backend kind)")
    @argument("--use", metavar="NAME", help="make a loaded backend the default")
    @argument("--stop", nargs="?", const="", metavar="NAME", help="unload NAME (default: the default backend)")
    @argument("--list", action="store_true", help="list backend kinds and whether each can load here")
    @BACKEND_OPTIONS.decorate
    @line_magic
    def llm_backend(self, line: str) -> None:
        """Load, list, switch and stop backends. Other --options go to the backend
        (--device, --dtype, --threads, --max-num-seqs, ...; --backend-option KEY=VALUE also works)."""
        from IPython.display import display

        from jupyter_llm.views import kind_rows, table_bundle

        words, backend_words = split_backend_words(_words(line), self.llm_backend.parser)
        args, extra = self.llm_backend.parser.parse_known_args(words)
        with _user_errors():
            if args.list:
                display(table_bundle(kind_rows(self._available()), title="Backends"), raw=True)
            elif args.use:
                self.manager.use(args.use)
                print(f"default backend: {args.use}")
            elif args.stop is not None:
                name = args.stop or None
                resolved = self.manager.resolve_name(name)
                self.manager.unload(resolved)
                print(f"stopped {resolved}")
            elif args.backend:
                options = backend_options(backend_words + extra, args.backend_option)
                model = options.pop("model", None) or args.model  # --model M reads as the positional MODEL
                info = self.manager.load(args.backend, model, name=args.name, **options)
                print(f"loaded {info.model} on {info.backend} as {info.name!r} ({info.device}, {info.dtype}); "
                      f"it is the default backend")
            else:
                if extra or backend_words or args.backend_option:
                    unexpected = backend_words + extra + [f"--backend-option {o}" for o in args.backend_option or ()]
                    raise ParamError(f"unexpected arguments {unexpected}; name a backend to pass options to it")
                display(self.status_table(), raw=True)

    def _available(self):
        from jupyter_llm.backends import available_backends

        return available_backends()

    def status_table(self) -> dict[str, str]:
        from jupyter_llm.views import backend_rows, table_bundle

        rows = backend_rows(self.manager)
        if not rows:
            return {"text/plain": "No backend loaded. Load one with %llm_backend hf (or native)."}
        return table_bundle(rows, title="Loaded backends")

    # --- %%generate -------------------------------------------------------------------
    @magic_arguments()
    @argument("--backend", help="loaded backend name (default: the default backend)")
    @SAMPLING.decorate
    @STRUCTURED.decorate
    @argument("-f", "--format", choices=FORMATS,
              help="render answers as text, Markdown, a code block or JSON (default: json for --json and "
                   "--json-schema, else text)")
    @argument("--chat", action="store_true", default=None, help="send as chat messages (chat template)")
    @argument("--system", help="system prompt (implies --chat)")
    @argument("-o", "--output", metavar="VAR", help="store the list of Completions in VAR")
    @argument("--no-stream", action="store_true", help="show the answers when complete")
    @argument("--no-interpolate", action="store_true", help="send {braces} as written")
    @no_var_expand  # the line as written: a --regex's {3} is a quantifier, not a Python expression
    @cell_magic
    def generate(self, line: str, cell: str) -> None:
        """Generate from the cell body. Prompts separated by a line `---` run as one batch;
        {name} interpolates variables ({{ escapes); --chat with {history} sends a conversation.
        One of --json-schema, --json, --regex, --choice, --grammar constrains the answers."""
        args = _parse(self.generate, line)
        with _user_errors():
            params = params_from_args(args, self.max_tokens, self.temperature)
            structured = structured_from_args(args, self.shell.user_ns if self.shell is not None else None)
            params = params.replace(structured=structured)
            chat = bool(args.chat if args.chat is not None else self.chat) or bool(args.system)
            prompts = self._prompts(cell, chat, interpolate_vars=not args.no_interpolate)
            backend = args.backend or self.default_backend or None
            if not self.manager.names():
                self._load_default()
            self._run_generate(prompts, params, backend, chat, args.system or self.system or None,
                               stream=self.stream and not args.no_stream, output=args.output,
                               fmt=args.format or default_format(structured))

    def _prompts(self, cell: str, chat: bool, interpolate_vars: bool) -> list[Any]:
        namespace = self.shell.user_ns if self.shell is not None else {}
        prompts: list[Any] = []
        for part in _SEPARATOR.split(cell):
            if not part.strip():
                continue
            variable = whole_variable(part, namespace) if (chat and interpolate_vars) else None
            if isinstance(variable, list) and variable and all(isinstance(m, dict) for m in variable):
                prompts.append(variable)  # a conversation: list of {"role", "content"}
            else:
                text = part.strip("\n")
                prompts.append(interpolate(text, namespace) if interpolate_vars else text)
        if not prompts:
            raise ParamError("the cell is empty: write the prompt in the cell body")
        return prompts

    def _load_default(self) -> None:
        info = self.manager.load_default()
        print(f"No backend was loaded: loaded {info.model} on {info.backend}.")

    def _run_generate(self, prompts: list[Any], params: SamplingParams, backend: str | None, chat: bool,
                      system: str | None, stream: bool, output: str | None, fmt: str = "text") -> None:
        from jupyter_llm.notebook.display import StreamView, show_completions
        from jupyter_llm.views import summary_line

        target = self.manager.get(backend)
        metadata = {"backend": target.kind, "model": target.model_name, "params": params.to_dict(), "chat": chat}
        events = self.manager.stream(prompts if len(prompts) > 1 else prompts[0], params, backend, chat, system)
        keys = [(p, s) for p in range(len(prompts)) for s in range(params.n)]
        view = StreamView(keys, metadata, labels=len(keys) > 1, fmt=fmt) if stream else None
        interrupted = False
        try:
            for event in events:
                if view is not None:
                    view.add(event)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            events.close()
        completions = events.completions
        if view is not None:
            view.finish(completions)
        else:
            show_completions(completions, metadata, fmt)
        if output:
            self.shell.user_ns[output] = completions
        errors = sorted({c.error for c in completions if c.error})
        for error in errors:
            print(f"error from backend {target.kind!r}: {error}")
        if params.logprobs is not None:
            self._show_logprobs(completions)
        note = " · interrupted: generation cancelled, partial output kept" if interrupted else ""
        print(summary_line(completions) + note)

    def _show_logprobs(self, completions: list[Any]) -> None:
        from IPython.display import display

        from jupyter_llm.views import table_bundle

        for c in completions:
            rows = [{"token": repr(lp.token), "logprob": f"{lp.logprob:.3f}",
                     "top alternatives": ", ".join(f"{t!r} {v:.2f}" for _, t, v in lp.top)}
                    for lp in (c.logprobs or [])]
            if rows:
                display(table_bundle(rows, title=f"logprobs (prompt {c.prompt_index}, sample {c.index})"), raw=True)

    # --- %llm_serve ------------------------------------------------------------------------
    @magic_arguments()
    @SERVE.decorate
    @argument("--status", action="store_true", help="show the servers running in this kernel")
    @argument("--stop", action="store_true", help="stop the servers (or the one on --port) and free their ports")
    @line_magic
    def llm_serve(self, line: str) -> None:
        """Serve the loaded models over an OpenAI-compatible HTTP API, in the background:
        the kernel stays usable. Binds 127.0.0.1 unless --host says otherwise."""
        from IPython.display import display

        from jupyter_llm.server import launcher
        from jupyter_llm.server.settings import key_hint, settings_from_args
        from jupyter_llm.views import table_bundle

        args = _parse(self.llm_serve, line)
        with _user_errors():
            if args.stop:
                stopped = launcher.stop_servers(args.port)
                print("\n".join(f"stopped the server at {h.url}" for h in stopped) or "no server is running")
            elif args.status:
                rows = [h.status() for h in launcher.running_servers()]
                if rows:
                    display(table_bundle(rows, title="Servers"), raw=True)
                else:
                    print("no server is running")
            else:
                settings = settings_from_args(args)
                handle = launcher.start_server(self.manager, settings)
                if settings.warning:
                    print(f"Warning: {settings.warning}")
                print(launcher.banner(handle.url, self.manager.names(), self.manager.default, key_hint(args),
                                      "Status: %llm_serve --status · stop: %llm_serve --stop"))

    # --- %llm_bench ---------------------------------------------------------------------
    @magic_arguments()
    @BENCH.decorate
    @argument("-o", "--output", metavar="VAR", help="store the BenchResult in VAR")
    @line_magic
    def llm_bench(self, line: str) -> None:
        """Benchmark loaded backends and OpenAI-compatible URLs: a table and inline charts."""
        from IPython.display import Image, display

        from jupyter_llm.bench.charts import figure_png
        from jupyter_llm.bench.command import run_from_args

        args = _parse(self.llm_bench, line)
        with _user_errors():
            result, compare = run_from_args(args, self.manager, self.shell.user_ns if self.shell else None)
        display(result.table(), raw=True)
        if not args.no_plot:
            display(Image(figure_png(result.plot(compare))))
        failed = [r for r in result.rows if r["errors"]]
        for row in failed:
            print(f"{row['target']} at {row['load']}: {row['errors']:g} failed requests, "
                  f"e.g. {row['error_examples'][0]}")
        if args.output:
            self.shell.user_ns[args.output] = result

    # --- %llm_playground ------------------------------------------------------------------
    @line_magic
    def llm_playground(self, line: str) -> None:
        """Show the sampling playground widget (jupyter_llm.Playground); the rest of the line
        is its first prompt. With no backend loaded, the embedded model loads first, as for %%generate."""
        from IPython.display import display

        from jupyter_llm.notebook.widgets import Playground

        with _user_errors():
            if not self.manager.names():
                self._load_default()
        display(Playground(prompt=line.strip()))
