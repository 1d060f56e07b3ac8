"""Flax models: VAE, noise-prediction U-Net, CLIP-style ECG/text encoders, the local sentence encoder."""
