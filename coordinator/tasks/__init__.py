"""Tasks: what a run learns, on which data, scored how (classification, LoRA, diffusion, continual, your own)."""
