"""TensorRT plugin handling (filled by the engine-building work; nothing here yet)."""
