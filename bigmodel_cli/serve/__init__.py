"""`bigmodel serve`: an OpenAI-compatible HTTP server (uvicorn + FastAPI) over a continuously batching engine."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from bigmodel_cli.errors import UserError

MAX_BATCH_LIMIT = 256  # slots beyond this only grow the KV cache: no CPU or accelerator decodes more at once
DEFAULT_CONTEXT = 4096  # --max-model-len 0 means the model's positions up to this: a 32k-position model's
# full-length KV cache for 8 slots would take gigabytes that few requests use


def run(
    model: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str = "",
    max_batch: int = 8,
    max_model_len: int = 0,
    name: str = "",
    quantize: str = "",
) -> None:
    """Load the model, compile the engine, and answer requests until interrupted."""
    import uvicorn

    from bigmodel_cli.evaluate.generate import open_model, stop_ids
    from bigmodel_cli.serve.app import Served, create_app
    from bigmodel_cli.serve.engine import Engine
    from bigmodel_cli.tasks.chat import chat_format

    if not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise UserError(f"--max-batch must be in [1, {MAX_BATCH_LIMIT}], got {max_batch}")
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in [0, 65535] (0 = any free port), got {port}")
    listener = _listen(host, port)  # before the model loads: a taken port fails at once
    loaded, tokenizer, _info = open_model(model, quantize)
    positions = loaded.model_cfg.max_seq_len
    if max_model_len > positions or max_model_len < 0:
        raise UserError(f"--max-model-len must be in [1, {positions}] (the model's positions), got {max_model_len}")
    engine = Engine(loaded, max_batch, max_model_len or min(positions, DEFAULT_CONTEXT))
    print(f"compiling the decoder for contexts up to {engine.max_len} tokens", file=sys.stderr, flush=True)
    engine.start()
    stops = frozenset(stop_ids(loaded, tokenizer))
    served = Served(engine, tokenizer, chat_format(tokenizer), name or str(model), api_key, stops)
    bound_host, bound_port = listener.getsockname()[:2]
    print(
        f"serving {served.name!r} at http://{bound_host}:{bound_port}/v1 (max batch {max_batch}, context "
        f"{engine.max_len} tokens{', API key required' if api_key else ''})",
        file=sys.stderr,
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(create_app(served), log_level="warning", access_log=False))
    try:
        server.run(sockets=[listener])
    finally:
        engine.close()
        listener.close()


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (IPv6 when host is an IPv6 address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        raise UserError(
            f"cannot listen on {host}:{port} ({err.strerror or err}): pick another --host or --port"
        ) from None
    return sock
