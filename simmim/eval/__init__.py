"""Evaluation tools for a pretrained encoder: the linear probe (`python -m simmim.probe`)."""
