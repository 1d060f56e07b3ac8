"""Datasets: the prepared-example schema and the tf.data input pipeline feeding sharded jax.Arrays."""
