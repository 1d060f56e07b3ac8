"""Evaluation metrics on generated ECGs: FID / rFID and manifold precision-recall on CLIP features, heart-rate
MAE (the multi-lead consensus detector, or the published protocol's XQRS), CLIP score. Import the submodules
(`diffusets_jax.metrics.fid`, ...)."""
