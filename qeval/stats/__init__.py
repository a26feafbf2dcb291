"""Statistics beside the run: tensor statistics (why some tensor types are harder to quantize,
``tensors``, ``cli``) and paired comparisons of a quantized cell with its FP cell (``paired``)."""
