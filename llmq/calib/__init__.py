"""Calibration: text, the architecture maps, and the layer-by-layer harness every method runs on."""
