"""Reading images and mapping them to and from the model's input: numpy, Pillow and OpenCV only (no torch),
so that training, evaluation, ``predict`` and the ONNX runner share one decoder and one geometry."""
