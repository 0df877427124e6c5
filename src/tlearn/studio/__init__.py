"""`tlearn studio`: a local web app from a folder of photos to a trained model, for people who do not code.

Importing this package starts nothing; `run` serves a workspace, `create_app` builds the ASGI app.
"""
from tlearn.studio.app import create_app
from tlearn.studio.guard import StudioSettings
from tlearn.studio.server import run

__all__ = ["StudioSettings", "create_app", "run"]
