"""sdcore: Stable Diffusion 1.x in plain PyTorch."""
