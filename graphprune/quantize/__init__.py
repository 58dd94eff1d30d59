"""Quantization to Q/DQ ONNX that keeps the sparse pattern: grids from :mod:`graphprune.algorithms.quant_grid`,
activation ranges measured in the graph, SmoothQuant folds, the pass, and :func:`files.quantize_file`."""
