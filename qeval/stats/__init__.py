"""Tensor statistics: why some tensor types are harder to quantize than others."""
