from pathlib import Path

import pytest

from diffusets_jax.config import load_config
from diffusets_jax.train.optim import learning_rate_schedule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("num_steps", [2, 1000])
def test_a_warmup_as_long_as_the_run_is_refused(num_steps):
    """improved_unet.py's 1000 warm-up steps in a run of <= 1000 steps trained at a rate that never reached
    optimizer.learning_rate nor decayed (optax stretched the schedule to warmup + 1 steps), silently."""
    optimizer = load_config(CONFIGS / "improved_unet.py").optimizer
    assert optimizer.warmup_steps == 1000
    with pytest.raises(ValueError, match=rf"optimizer.warmup_steps=1000 is not below the run's {num_steps} training "
                                         r"steps"):
        learning_rate_schedule(optimizer, num_steps)


def test_a_warmup_shorter_than_the_run_peaks_then_decays():
    optimizer = load_config(CONFIGS / "improved_unet.py", ["optimizer.warmup_steps=10"]).optimizer
    schedule = learning_rate_schedule(optimizer, 100)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(optimizer.learning_rate)
    assert float(schedule(100)) == pytest.approx(optimizer.learning_rate * optimizer.cosine_final_fraction)
