"""Compression methods. ``svd`` is training-free; the others are calibration methods driven by the engine."""
