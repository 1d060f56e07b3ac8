"""MIMIC-IV-ECG TFDS builder (`mimic_iv_ecg`)."""

from data_prep.mimic_iv_ecg.mimic_iv_ecg_dataset_builder import Builder

__all__ = ["Builder"]
