"""Evaluation metrics on generated ECGs: FID / rFID and manifold precision-recall on CLIP features, heart-rate
MAE (XQRS), CLIP score. Import the submodules (`diffusets_jax.metrics.fid`, ...)."""
