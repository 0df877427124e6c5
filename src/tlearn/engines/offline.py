"""No outbound connection from the inference runtimes: OpenVINO's telemetry kept silent, in this process only.

`import openvino` imports its model converter (openvino.tools.ovc), which sends an "import" event with a client
id to Google Analytics, and more events on conversion, unless the user opted out with `opt_in_out --opt_out`
(a file in ~/intel). Every ovc module that sends them falls back to ovc's own no-op stub when the
`openvino_telemetry` package cannot be imported; `quiet_openvino` makes that import fail for this process,
without touching the user's files or environment.
"""
from __future__ import annotations

import sys

TELEMETRY = "openvino_telemetry"
CONVERTER_MODULES = ("telemetry_utils", "convert_impl", "main", "utils")  # ovc modules holding `tm`


def quiet_openvino() -> None:
    """Call before the first `import openvino` of the process: no telemetry is sent from then on."""
    if TELEMETRY not in sys.modules:
        sys.modules[TELEMETRY] = None  # `import openvino_telemetry` raises ImportError -> ovc uses its stub
        return
    if sys.modules[TELEMETRY] is None:
        return
    # openvino was imported before (its import event is gone already): point the converter at the stub
    from openvino.tools.ovc import telemetry_stub

    for name in CONVERTER_MODULES:
        module = sys.modules.get(f"openvino.tools.ovc.{name}")
        if module is not None and hasattr(module, "tm"):
            module.tm = telemetry_stub
