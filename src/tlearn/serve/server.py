"""Run the app under uvicorn in this process; SIGTERM drains (readiness 503, in-flight answered) and exits 0."""
from __future__ import annotations

import signal
from pathlib import Path

import uvicorn

from tlearn.serve.app import create_app
from tlearn.serve.limits import ServeSettings


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the service it is draining as soon as a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame) -> None:
        self.service.draining = True
        super().handle_exit(sig, frame)


def run(model_dir: Path, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
        engine: str = "auto", log_level: str = "info") -> None:
    """Load the model once and serve it until SIGTERM or Ctrl-C; returns after a graceful drain."""
    from tlearn.predict import Predictor

    predictor = Predictor.load(model_dir, engine=engine, batch_size=settings.max_batch)
    app = create_app(predictor, settings)
    config = uvicorn.Config(app, host=host, port=port, lifespan="on", log_level=log_level,
                            # in-flight requests end by their own timeout; the margin covers the last batch
                            timeout_graceful_shutdown=int(settings.timeout_s) + 5)
    # uvicorn re-raises the stop signal once it has drained; a SIGTERM we drained for is a clean exit (code 0)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        DrainingServer(config, app.state.service).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
