"""ONNX graph handling: loading/saving, the graph index, BN folding, the quantization plan and the QDQ rewrite."""
