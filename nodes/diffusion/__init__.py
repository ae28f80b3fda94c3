"""The diffusion maths and model objects beneath the SD nodes (no node classes here)."""
