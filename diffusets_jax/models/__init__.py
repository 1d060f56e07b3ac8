"""Flax models: the VAE, the noise-prediction U-Net, the CLIP ECG/text towers and shared layers."""
