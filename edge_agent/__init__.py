"""fedfleet edge agent: the device side. Depends on numpy, onnxruntime, paho-mqtt and zstandard; never on torch."""

__version__ = "0.1.0"
