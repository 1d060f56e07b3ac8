"""PhysioNet/CinC Challenge 2020-2021 TFDS builder (`physionet_challenge`)."""

from data_prep.physionet_challenge.physionet_challenge_dataset_builder import Builder

__all__ = ["Builder"]
