"""Evaluation tools for a pretrained encoder: the linear probe (`python -m simmim.probe`) and the window and
resolution transfer study (`python -m simmim.transfer`)."""
