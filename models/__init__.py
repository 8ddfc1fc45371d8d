"""Torch model definitions, exporters (ONNX, TFLite) and model packages."""
