"""Running the app on uvicorn: the listening socket, signals, draining.

The socket is bound before uvicorn starts, so a port in use is one clear error (and
``--port 0`` can report the port it got). On SIGTERM (or Ctrl+C) uvicorn stops accepting
connections, lets the requests in progress finish (up to ``drain_s``), then the batchers
stop and the process exits 0. Uvicorn re-raises the signal once it has shut down, to let
the default handler end the process; our handler takes it instead, so the exit status says
the server stopped as asked, not that it was killed.
"""

from __future__ import annotations

import logging
import signal
import socket
from typing import Any

import uvicorn

from lora_cli.errors import LoraCliError, UserInputError

logger = logging.getLogger("lora_cli.serve")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 when the host is one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserInputError(f"--host {host!r} is not an address this machine can listen on ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        why = "is in use by another program" if exc.errno in (98, 48) else f"cannot be opened ({exc.strerror})"
        raise UserInputError(f"port {port} on {host} {why}; pick another with --port (--port 0 picks a free one)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, saying when it starts draining."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.should_exit:
            name = signal.Signals(sig).name
            logger.info("%s: finishing the requests in progress, then stopping", name)
        super().handle_exit(sig, frame)


def run(app: Any, sock: socket.socket, drain_s: float) -> None:
    """Serve ``app`` on ``sock`` until SIGTERM / SIGINT; returns after draining."""
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", server_header=False,
                            timeout_graceful_shutdown=drain_s, timeout_keep_alive=5)
    server = _Server(config)
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, f: received.append(s)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    if not server.started:
        raise LoraCliError("the server did not start (see the messages above)")
    logger.info("stopped")
