"""Patient features: parsing, validation, and the U-Net's (sex, age, heart rate) inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffusets_jax.conditioning.patient import (
    MissingPatientValue,
    parse_age,
    parse_heart_rate,
    parse_sex,
    patient_features,
)


@pytest.mark.parametrize("value, expected", [
    ("M", 1), ("m", 1), ("Male", 1), (" MALE ", 1), ("F", 0), ("female", 0), ("FEMALE", 0),
    (1, 1), (0, 0), ("1", 1), ("0", 0), (1.0, 1), (np.int64(0), 0),
])
def test_parse_sex(value, expected):
    assert parse_sex(value) == expected


def test_parse_sex_ptbxl_coding():
    assert parse_sex(0, male_code=0) == 1 and parse_sex("1", male_code=0) == 0
    assert parse_sex("M", male_code=0) == 1  # words are unambiguous


@pytest.mark.parametrize("value", ["X", "unknown", 2, -1, 0.5, True])
def test_parse_sex_rejects(value):
    with pytest.raises(ValueError, match=r"sex: .*allowed: M, F, male, female"):
        parse_sex(value)


@pytest.mark.parametrize("value", [None, "", math.nan, "NaN"])
def test_parse_sex_missing(value):
    with pytest.raises(MissingPatientValue, match="sex is missing"):
        parse_sex(value)


def test_parse_age():
    assert parse_age("78") == 78.0 and parse_age(65.5) == 65.5 and parse_age(0) == 0.0 and parse_age(120) == 120.0
    assert parse_age(np.float32(91)) == 91.0


@pytest.mark.parametrize("value", [300, "300", 300.0, None, "", math.nan])
def test_parse_age_missing_including_ptbxl_sentinel(value):
    with pytest.raises(MissingPatientValue, match="age"):
        parse_age(value)


@pytest.mark.parametrize("value, message", [
    (-1, "out of range"), (121, "out of range"), (250, "out of range"), ("old", "cannot parse"), (math.inf, "finite"),
])
def test_parse_age_rejects(value, message):
    with pytest.raises(ValueError, match=rf"age: .*{message}.*0 to 120 years") as info:
        parse_age(value)
    assert not isinstance(info.value, MissingPatientValue)


def test_parse_heart_rate():
    assert parse_heart_rate("72") == 72.0 and parse_heart_rate(20) == 20.0 and parse_heart_rate(300.0) == 300.0
    for bad in (19.9, 301, -60, "fast"):
        with pytest.raises(ValueError, match=r"heart_rate: .*20 to 300 bpm"):
            parse_heart_rate(bad)
    with pytest.raises(MissingPatientValue):
        parse_heart_rate(None)


def test_patient_features_faithful_is_raw():
    out = patient_features([1, 0], [78.0, 65.0], [57.1, 123.5])
    assert out.dtype == np.float32 and out.shape == (2, 3)
    np.testing.assert_array_equal(out, np.array([[1, 78, 57.1], [0, 65, 123.5]], np.float32))


def test_patient_features_normalised():
    out = patient_features(np.array([1, 0]), np.array([78.0, 65.0]), np.array([60.0, 120.0]), mode="normalised")
    np.testing.assert_allclose(out, [[1, 0.78, 0.6], [0, 0.65, 1.2]], rtol=1e-6)


def test_patient_features_scalars():
    assert patient_features(1, 50, 80).shape == (1, 3)


@pytest.mark.parametrize("sex, age, hr, message", [
    ([1, 2], [50, 50], [60, 60], r"sex\[1\] = 2.0 is out of range"),
    ([1, 0], [50, 300], [60, 60], r"age\[1\] = 300.0 is out of range .*0 to 120 years"),
    ([1, 0], [50, 50], [60, math.nan], r"heart_rate\[1\] = nan"),
    ([1, 0], [50], [60, 60], "same length"),
])
def test_patient_features_validation(sex, age, hr, message):
    with pytest.raises(ValueError, match=message):
        patient_features(sex, age, hr)


def test_patient_features_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        patient_features(1, 50, 80, mode="zscore")
