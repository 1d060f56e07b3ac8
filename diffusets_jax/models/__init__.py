"""Flax models: the ECG VAE, the noise-prediction U-Net, Net1D and the ECG-text CLIP model.

`bundle.save_model` / `bundle.load_model` store any of them on disk as config JSON + Orbax checkpoint.
"""
