"""The first run on a machine builds the backbone's engine: ONNX then OpenVINO, or OpenVINO straight from torch?

    .venv/bin/python bench/engine_build.py [--backbone efficientnet_lite0] [--repeats 3]

Times, in fresh temporary folders, (a) tlearn's path: torch.onnx.export of the engine graph, then OpenVINO reading
and compiling the ONNX file; (b) openvino.convert_model on the torch module, then compiling it. Both outputs are
compared with eager torch on the probe photos. The faster verified path is the one to keep (bench/README.md).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import openvino as ov
    import torch

    from tlearn.backbones import create_backbone, get_spec
    from tlearn.engines import probe_pixels
    from tlearn.engines.export import export_onnx
    from tlearn.engines.reference import PixelsToOutputs, TorchEngine
    from tlearn.engines.runtimes import OpenVinoEngine

    prep = get_spec(args.backbone).preprocessing
    graph = PixelsToOutputs(create_backbone(args.backbone)[0], prep)
    pixels = probe_pixels(prep)
    reference = TorchEngine(graph)(pixels)
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as work:
            start = time.perf_counter()
            export_onnx(graph, Path(work) / "model.onnx")
            exported = time.perf_counter()
            engine = OpenVinoEngine(Path(work) / "model.onnx")
            onnx_done = time.perf_counter()
            onnx_diff = float(np.abs(engine(pixels) - reference).max())

            start2 = time.perf_counter()
            with torch.inference_mode():
                model = ov.convert_model(graph.eval(), example_input=torch.zeros((2, 3, prep.input_size,
                                                                                  prep.input_size), dtype=torch.uint8))
            converted = time.perf_counter()
            compiled = ov.Core().compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT"})
            direct_done = time.perf_counter()
            direct_diff = float(np.abs(compiled([pixels])[0] - reference).max())
        print(f"run {repeat + 1}: ONNX export {exported - start:.2f}s + OpenVINO compile {onnx_done - exported:.2f}s "
              f"= {onnx_done - start:.2f}s (max diff {onnx_diff:.1e}); convert_model {converted - start2:.2f}s + "
              f"compile {direct_done - converted:.2f}s = {direct_done - start2:.2f}s (max diff {direct_diff:.1e})",
              flush=True)


if __name__ == "__main__":
    main()
