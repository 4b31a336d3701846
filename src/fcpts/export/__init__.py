"""Formats that run without fcpts: ONNX for onnxruntime."""
