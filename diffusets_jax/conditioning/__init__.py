"""Conditioning inputs of the U-Net: ordered prompts, their text embeddings (OpenAI or a local Flax
sentence encoder, behind a durable cache), and validated patient features (sex, age, heart rate)."""
