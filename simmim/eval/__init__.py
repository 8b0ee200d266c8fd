"""Evaluation tools for a pretrained encoder and for the SwinV2 paper's claims: the linear probe
(`python -m simmim.probe`), the window and resolution transfer study (`python -m simmim.transfer`) and the
activation study (`python -m simmim.activations`), with the classifier training the studies share (`classify`)."""
