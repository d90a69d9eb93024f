"""The app of `jupyter-llm serve` mounted under a prefix of a larger Starlette app, as a user
embeds it in a service of their own, served by uvicorn in this process until SIGINT: the real
server that issue 19's item 4 needs (`jupyter-llm serve` itself cannot mount). It prints the
banner line that server_processes.CLIServer waits for.

    python tests/helpers/mounted_server.py --model FOLDER --prefix /llm --api-key KEY --rate-limit 2
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model folder, served by the native backend as 'tiny'")
    parser.add_argument("--prefix", default="/llm")
    parser.add_argument("--api-key", action="append", default=[])
    parser.add_argument("--rate-limit", type=float)
    args = parser.parse_args()

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    from jupyter_llm.manager import get_manager
    from jupyter_llm.server.app import create_app
    from jupyter_llm.server.launcher import bind, url_of
    from jupyter_llm.server.settings import ServerSettings

    manager = get_manager()
    manager.load("native", args.model, name="tiny", progress=False, threads=1, kv_cache_memory="4MiB",
                 fused_ops=False)
    settings = ServerSettings(port=0, api_keys=tuple(args.api_key), rate_limit=args.rate_limit)
    outer = Starlette(routes=[Route("/", lambda request: PlainTextResponse("the host service")),
                              Mount(args.prefix, app=create_app(manager, settings))])
    sock = bind(settings)
    url = url_of(settings, sock.getsockname()[1])
    # "server at URL/v1": the line CLIServer reads the URL from (the app itself answers under the prefix)
    print(f"jupyter-llm's app mounted under {args.prefix} of the server at {url}/v1 -> {url}{args.prefix}/v1",
          flush=True)
    try:
        uvicorn.Server(uvicorn.Config(outer, log_level="warning", proxy_headers=False)).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
