"""Flax models: the ECG VAE, the noise-prediction U-Net, Net1D and the ECG-text CLIP model, and the local
sentence encoder (`text_encoder`, a BERT/MiniLM port) that embeds reports without a third-party API.

`bundle.save_model` / `bundle.load_model` store any of them on disk as config JSON + Orbax checkpoint.
"""
