"""The DiffuSETS time base and array shapes, defined once for data preparation, models, sampling and metrics.

Every record is a whole 10-second recording resampled to 1024 samples (an effective 102.4 Hz), 12 leads in
the standard order, millivolts: ECGs are `(batch, 1024, 12)`. The VAE downsamples the length 8x into 4
channels: latents are `(batch, 128, 4)`.
"""

from __future__ import annotations

ECG_SECONDS = 10.0  # every DiffuSETS record is a whole 10-second recording
ECG_LENGTH = 1024  # samples per record after resampling
NUM_LEADS = 12
ECG_RATE_HZ = ECG_LENGTH / ECG_SECONDS  # 102.4 Hz, the effective sampling rate of a (1024, 12) record
ECG_SHAPE: tuple[int, int] = (ECG_LENGTH, NUM_LEADS)

LATENT_LENGTH = 128  # ECG_LENGTH / 8: three stride-2 levels of the published VAE
LATENT_CHANNELS = 4
LATENT_SHAPE: tuple[int, int] = (LATENT_LENGTH, LATENT_CHANNELS)
