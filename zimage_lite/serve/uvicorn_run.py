"""uvicorn on one machine, with the worker drained on SIGTERM/SIGINT: stop accepting, fail the queued
jobs, give the running one --grace seconds, then exit 0 (uvicorn would re-raise the signal)."""

from __future__ import annotations

import uvicorn

from zimage_lite.serve.app import create_app
from zimage_lite.serve.config import ServeConfig


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, grace: float):
        super().__init__(config)
        self.grace = grace

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit:  # a second signal: stop waiting
            self.force_exit = True
            return
        state = getattr(self.config.app.state, "server", None)  # set by the app's lifespan
        if state is not None:
            state.drain()
        self.should_exit = True  # not recorded as captured: no re-raise, the command returns 0


def serve_forever(config: ServeConfig, engine) -> None:
    app = create_app(config, engine=engine)
    uv = uvicorn.Config(
        app, host=config.host, port=config.port, access_log=False, log_level="warning",
        timeout_graceful_shutdown=int(config.grace_s) + 10, lifespan="on",
    )  # fmt: skip
    DrainingServer(uv, config.grace_s).run()
