"""Checkpoints → ONNX (with a KV cache) → optimized and quantized variants → TensorRT plans, with
parity checks against eager PyTorch; writes the model package. May import `trainer`."""
