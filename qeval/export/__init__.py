"""Exporters: qeval-quantized models in formats real kernels load."""
