"""`tlearn serve`: an HTTP inference server on the Predictor (FastAPI + uvicorn, micro-batched, with a web page).

Importing this package starts nothing; `run` serves a model folder, `create_app` builds the ASGI app.
"""
from tlearn.serve.app import create_app
from tlearn.serve.limits import Rejection, ServeSettings
from tlearn.serve.server import run

__all__ = ["ServeSettings", "Rejection", "create_app", "run"]
