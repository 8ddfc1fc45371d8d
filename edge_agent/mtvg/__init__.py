"""MTVG sampling on the device side (numpy): the sampling loop, prompts, outputs."""
