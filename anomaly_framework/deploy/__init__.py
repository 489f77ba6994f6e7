"""Deployment: exporting a run (TorchScript, ONNX, OpenVINO), what a prediction writes, and the torch-free ONNX runner."""
