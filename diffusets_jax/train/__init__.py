"""Training: train state, the generic sharded loop with Orbax checkpoints, and one recipe per model.

`state.py` (TrainState), `loop.py` (jitted step, checkpoints, exact resume, logging), `optim.py`
(optimisers and schedules from the reference spec), `vae.py`, `diffusion.py`, `clip.py` (losses, steps,
validation metrics) and `run.py` (config -> data -> model -> loop, used by `diffusets-jax train`).
"""
