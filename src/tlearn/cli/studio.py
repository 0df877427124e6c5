"""`tlearn studio`: the local web app over a workspace of projects."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tlearn.cli.common import USER_ERRORS, app, fail
from tlearn.console import out


@app.command()
def studio(
    workspace: Annotated[Path, typer.Argument(help="Folder of projects (a project: one sub-folder per class); "
                                              "made when absent.")] = Path("."),
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback exposes the studio to the "
                                           "network (a token is always required).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port; 0: any free port.")] = 0,
    token: Annotated[Optional[str], typer.Option(help="Token every request must carry (default: a new random one, "
                                                      "printed in the URL).")] = None,
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Print the URL, do not open a browser.")] = False,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body, an upload of photos (413 above).")
                           ] = 50.0,
    max_images: Annotated[int, typer.Option(help="Most photos per upload request (413 above).")] = 200,
    max_pixels: Annotated[int, typer.Option(help="Most pixels per photo, checked before decoding (413 above).")
                          ] = 40_000_000,
    timeout_s: Annotated[float, typer.Option(help="Most seconds for a request's body to arrive (408 above).")
                         ] = 60.0,
) -> None:
    """Open the studio: make projects from photos, train, see the accuracy and try the model, in the browser."""
    from tlearn.studio import StudioSettings, run

    try:
        settings = StudioSettings(workspace, host=host, port=port, token=token, max_body_mb=max_body_mb,
                                  max_images=max_images, max_pixels=max_pixels, timeout_s=timeout_s)
        run(settings, open_browser=not no_browser,
            say=lambda line: out.print(line, highlight=False, soft_wrap=True, markup=False))
    except USER_ERRORS as exc:
        fail(exc)
