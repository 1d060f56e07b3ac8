"""`config.optimizer` is checked before any work: values that would train wrongly instead of failing are refused."""

from pathlib import Path

import pytest

from diffusets_jax.config import load_config, optimizer_section
from diffusets_jax.train.optim import check_optimizer_section
from diffusets_jax.train.run import check_train_section

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.py")), ids=lambda p: p.stem)
def test_every_shipped_config_passes(path):
    config = load_config(path)
    check_optimizer_section(config.optimizer, str(path))
    check_train_section(config, str(path))


@pytest.mark.parametrize("key,value,expected", [
    ("learning_rate", -1e-4, "optimizer.learning_rate must be in (0, inf), got -0.0001"),  # gradient ascent
    ("learning_rate", 0.0, "optimizer.learning_rate must be in (0, inf)"),
    ("learning_rate", float("nan"), "optimizer.learning_rate must be a finite number"),
    ("b1", 1.5, "optimizer.b1 must be in [0, 1), got 1.5"),
    ("b2", 1.0, "optimizer.b2 must be in [0, 1)"),
    ("eps", 0.0, "optimizer.eps must be in (0, inf)"),
    ("weight_decay", -0.01, "optimizer.weight_decay must be in [0, inf)"),
    ("grad_clip_norm", float("nan"), "optimizer.grad_clip_norm must be a finite number"),
    ("warmup_steps", -4, "optimizer.warmup_steps must be in [0, inf)"),
    ("cosine_final_fraction", 1.5, "optimizer.cosine_final_fraction must be in [0, 1]"),
    ("one_cycle_pct_start", 1.0, "optimizer.one_cycle_pct_start must be in (0, 1)"),
    ("one_cycle_div_factor", 0.0, "optimizer.one_cycle_div_factor must be in (0, inf)"),
    ("lr_schedule", "linear", "optimizer.lr_schedule must be one of"),
])
def test_a_value_that_would_train_wrongly_is_refused_by_name(key, value, expected):
    optimizer = optimizer_section()
    optimizer[key] = value
    with pytest.raises(ValueError) as err:
        check_optimizer_section(optimizer, "configs/x.py")
    assert str(err.value).startswith("configs/x.py: ") and expected in str(err.value)


def test_the_closed_ends_of_each_range_are_allowed():
    optimizer = optimizer_section(b1=0.0, b2=0.0, weight_decay=0.0, grad_clip_norm=0.0, warmup_steps=0,
                                  cosine_final_fraction=1.0)
    check_optimizer_section(optimizer)
