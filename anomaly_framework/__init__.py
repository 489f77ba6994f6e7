"""anomaly_framework: faithful plain-PyTorch industrial visual anomaly detection.

    from anomaly_framework.main import run_experiment
    results = run_experiment({"model.name": "padim", "data.name": "demo"})

Importing the package itself loads nothing heavy (no torch): the torch-free ONNX runner lives here too.
"""
__version__ = "0.2.0"
