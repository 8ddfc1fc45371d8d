"""Numpy networks and their maths: MLP, LoRA, the video denoiser, losses, optimizers."""
