"""``python -m service``: serve the app with uvicorn, using ``SATSEG_*`` settings.

    python -m service [--checkpoint PATH] [--host HOST] [--port PORT]

The three options override ``SATSEG_CHECKPOINT``, ``SATSEG_HOST`` and ``SATSEG_PORT``; every
other setting is an environment variable (``service/settings.py``, docs/deployment.md).

SIGTERM drains (``/readyz`` 503 for ``SATSEG_SHUTDOWN_DRAIN_S`` while requests are served), then
stops within ``SATSEG_SHUTDOWN_GRACE_S``; SIGINT or a second SIGTERM skips the drain; SIGHUP
reloads the checkpoint as ``POST /admin/reload`` does. docs/deployment.md ("Signals") has the
details.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.engine import Engine
from service.errors import ApiError
from service.logs import configure_logging
from service.settings import Settings, invalid_settings_message

log = logging.getLogger("service")


class GracefulServer(uvicorn.Server):
    """A uvicorn server that reports not-ready on the first SIGTERM/SIGINT, keeps serving for
    the drain period (SIGTERM only), then stops within what is left of the grace period."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        on_drain: Callable[[], None],
        drain_s: float,
        grace_s: float,
    ) -> None:
        super().__init__(config)
        self._on_drain = on_drain
        self._drain_s = drain_s
        self._grace_s = grace_s
        self._drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_started is None and not self.should_exit:
            self._drain_started = time.monotonic()
            self._on_drain()
            log.info(
                "received %s: readiness is now 503; stopping within %.1f s",
                signal.Signals(sig).name,
                self._grace_s,
            )
            if self._drain_s > 0 and sig != signal.SIGINT:
                return  # on_tick ends the drain; Ctrl-C at a terminal skips it
            self._stop_accepting()
            return
        if not self.should_exit:  # a second signal during the drain: stop accepting now
            self._stop_accepting()
            return
        super().handle_exit(sig, frame)  # during the stop: uvicorn's (Ctrl-C again forces)

    async def on_tick(self, counter: int) -> bool:
        if (
            self._drain_started is not None
            and not self.should_exit
            and time.monotonic() - self._drain_started >= self._drain_s
        ):
            self._stop_accepting()
        return await super().on_tick(counter)

    def _stop_accepting(self) -> None:
        assert self._drain_started is not None
        left = self._grace_s - (time.monotonic() - self._drain_started)
        # What is left of the grace period goes to the requests still in flight.
        self.config.timeout_graceful_shutdown = max(1, int(left))
        self.should_exit = True


def reload_on_sighup(engine: Engine) -> None:
    """SIGHUP -> ``engine.reload()`` in a thread of its own (a signal handler must not block
    the event loop for the seconds a load takes)."""

    def reload() -> None:
        try:
            engine.reload()
        except ApiError as exc:  # refused or busy: already logged and counted by the engine
            log.warning("SIGHUP reload not done: %s", exc.message)

    def handle(sig: int, frame: FrameType | None) -> None:
        log.info("received SIGHUP: reloading %s", engine.settings.checkpoint)
        threading.Thread(target=reload, name="satseg-sighup-reload", daemon=True).start()

    signal.signal(signal.SIGHUP, handle)


def settings_from_args(argv: Sequence[str] | None = None) -> Settings:
    """``SATSEG_*`` settings with the command line's overrides; an unknown argument exits 2
    naming it, rather than being ignored by a server that then starts anyway."""
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve a SatSeg checkpoint over HTTP. Every other setting is a SATSEG_* "
        "environment variable (service/settings.py, docs/deployment.md).",
    )
    parser.add_argument("--checkpoint", help="checkpoint to serve (SATSEG_CHECKPOINT)")
    parser.add_argument("--host", help="bind address (SATSEG_HOST)")
    parser.add_argument("--port", type=int, help="port (SATSEG_PORT)")
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        message = invalid_settings_message(exc)
        parser.exit(2, f"python -m service: error: invalid settings: {message}\n")


def main(argv: Sequence[str] | None = None) -> None:
    settings = settings_from_args(argv)
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # Our handler formats every line (text or JSON, with request ids); the access line
        # comes from service.access, which knows the request id and the route.
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)),
        lifespan="on",
    )
    reload_on_sighup(app.state.engine)
    server = GracefulServer(
        config,
        on_drain=app.state.engine.begin_drain,
        drain_s=min(settings.shutdown_drain_s, settings.shutdown_grace_s / 2),
        grace_s=settings.shutdown_grace_s,
    )
    server.run()


if __name__ == "__main__":
    main()
