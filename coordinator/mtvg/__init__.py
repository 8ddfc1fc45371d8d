"""MTVG: multi-condition video generation with the fleet-trained denoiser."""
