"""Run a model on this (possibly emulated) CPU: `run_model.py MODEL FEEDS.npz OUT.npz`; an .onnx with
onnxruntime (graph optimizations on, as deployed), an OpenVINO .xml with OpenVINO at f32."""
import sys

import numpy as np


def main(model: str, data: str, out: str) -> None:
    feeds = dict(np.load(data))
    if model.endswith(".xml"):
        import openvino as ov

        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        names = {p.get_any_name() for p in compiled.inputs}
        result = compiled({k: v for k, v in feeds.items() if k in names})
        np.savez(out, output=np.asarray(result[compiled.output(0)]))
        return
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    np.savez(out, output=session.run(None, {k: v for k, v in feeds.items() if k in names})[0])


if __name__ == "__main__":
    main(*sys.argv[1:4])
