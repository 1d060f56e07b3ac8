"""TFDS dataset builders, one folder per ECG source in the `tfds new` layout.

Each folder holds `<name>_dataset_builder.py` (class `Builder`), `README.md`, `CITATIONS.bib`, `TAGS.txt`.
Build with `tfds build data_prep/<name> --manual_dir DIR --data_dir DIR [--config openai]` or with
`diffusets-jax prepare <source> --manual-dir DIR --data-dir DIR`; read with
`tfds.builder("<name>", data_dir=DIR, config="local")` after importing `data_prep.<name>` (see
`diffusets_jax.data.sources`). The shared machinery lives in `diffusets_jax.data.builder`.
"""
