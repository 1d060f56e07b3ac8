"""diffusets-jax: a JAX/Flax reimplementation of DiffuSETS (arXiv 2501.05932).

Latent diffusion that generates 10-second 12-lead ECGs (1024 samples x 12 leads, standard lead order
I, II, III, aVR, aVL, aVF, V1-V6, millivolts) from clinical text reports plus sex, age and heart rate.
"""

__version__ = "0.1.0"
