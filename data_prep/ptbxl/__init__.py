"""PTB-XL TFDS builder (`ptbxl`)."""

from data_prep.ptbxl.ptbxl_dataset_builder import Builder

__all__ = ["Builder"]
