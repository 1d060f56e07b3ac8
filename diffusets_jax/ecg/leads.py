"""Lead names and orders: the standard 12-lead order, the MIMIC order of the published code, reordering by name.

The project works in the standard 12-lead order; the published DiffuSETS code (trained on MIMIC-IV-ECG)
uses the MIMIC order, which swaps aVL and aVF.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

STANDARD_LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
MIMIC_LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")

# REFERENCE_TO_STANDARD[i] = index in the reference (MIMIC) order of standard lead i, so that
# `standard = reference[..., REFERENCE_TO_STANDARD]`. The swap is its own inverse.
REFERENCE_TO_STANDARD: tuple[int, ...] = tuple(MIMIC_LEADS.index(lead) for lead in STANDARD_LEADS)

# Canonical spelling of every lead name we accept, keyed by the upper-cased name. WFDB headers from
# different carts write "AVL", "aVL" or "avl"; PhysioNet Challenge files sometimes add spaces.
_LEAD_BY_KEY: dict[str, str] = {lead.upper(): lead for lead in STANDARD_LEADS}


# Leads some recorders add to the 12: the Frank leads of PTB's 15-lead records (vx, vy, vz), posterior V7-V9 and
# right-sided V3R-V6R. Upper-cased, spaces removed, as `canonical_lead_name` keys names. No model takes them, but a
# record that has them is not misnamed: a reader of any lead subset (`io.reference`) passes them by.
EXTRA_LEADS: frozenset[str] = frozenset({"VX", "VY", "VZ", "V7", "V8", "V9", "V3R", "V4R", "V5R", "V6R"})


def is_extra_lead(name: str) -> bool:
    """Whether `name` is one of `EXTRA_LEADS` (any case and spacing): a real lead beyond the standard 12."""
    return "".join(str(name).split()).upper() in EXTRA_LEADS


class LeadNameError(ValueError):
    """A record's lead names cannot be mapped onto the requested lead order."""


class UnknownLeadError(LeadNameError):
    """A lead name is not one of the 12 standard leads (under any accepted spelling)."""


class MissingLeadError(LeadNameError):
    """A requested lead is absent from the record (e.g. a 2- or 6-lead recording)."""


def canonical_lead_name(name: str) -> str:
    """The standard spelling of a lead name: 'AVL', 'avl', ' aVL ' -> 'aVL'; 'v1' -> 'V1'.

    Raises UnknownLeadError for anything that is not one of the 12 standard leads.
    """
    parts = str(name).split()
    # Spaces inside a name are dropped ("V 1"), but leads listed with spaces are not one lead: "I II" read as
    # "III", so `--observe "I II"` observed lead III alone.
    if len(parts) > 1 and all(part.upper() in _LEAD_BY_KEY for part in parts):
        raise UnknownLeadError(f"lead name {name!r} is several leads ({', '.join(_LEAD_BY_KEY[p.upper()] for p in parts)})"
                               "; separate lead names with commas, e.g. 'I,II'")
    key = "".join(parts).upper()
    if key.startswith("LEAD"):
        key = key[4:]
    if key not in _LEAD_BY_KEY:
        raise UnknownLeadError(f"unknown lead name {name!r}; expected one of {', '.join(STANDARD_LEADS)}")
    return _LEAD_BY_KEY[key]


def lead_permutation(
    lead_names: Sequence[str], target: Sequence[str] = STANDARD_LEADS, allow_extra: bool = False
) -> list[int]:
    """Column indices that take a record with columns `lead_names` to the `target` order.

    Unknown lead names raise UnknownLeadError unless `allow_extra` (then e.g. a 15-lead record's Frank leads
    vx, vy, vz are ignored as long as every target lead is present). A lead named twice is an error because
    we cannot tell which column is right.
    """
    canonical: list[str | None] = []
    for name in lead_names:
        try:
            canonical.append(canonical_lead_name(name))
        except UnknownLeadError:
            if not allow_extra:
                raise
            canonical.append(None)
    duplicates = sorted({lead for lead in canonical if lead is not None and canonical.count(lead) > 1})
    if duplicates:
        raise LeadNameError(f"lead(s) {', '.join(duplicates)} appear more than once in {list(lead_names)}")
    wanted = [canonical_lead_name(name) for name in target]
    missing = [lead for lead in wanted if lead not in canonical]
    if missing:
        raise MissingLeadError(f"record has leads {list(lead_names)}; missing {', '.join(missing)}")
    return [canonical.index(lead) for lead in wanted]


def reorder_leads(
    signal: np.ndarray, lead_names: Sequence[str], target: Sequence[str] = STANDARD_LEADS, allow_extra: bool = False
) -> np.ndarray:
    """Reorder the lead (last) axis of `signal` (..., n_leads) from `lead_names` to `target` by name.

    Works for any leading shape, e.g. (5000, 12) or (batch, 1024, 12). Accepts the usual spellings of lead
    names ("AVL"/"aVL"); raises MissingLeadError / UnknownLeadError (both ValueError) naming the leads.
    """
    signal = np.asarray(signal)
    if signal.shape[-1] != len(lead_names):
        raise LeadNameError(f"signal has {signal.shape[-1]} leads on its last axis but {len(lead_names)} names")
    return signal[..., lead_permutation(lead_names, target, allow_extra)]


# The four limb leads that leads I and II determine exactly (Einthoven's law, Goldberger's augmented leads).
DERIVED_LIMB_LEADS: tuple[str, ...] = ("III", "aVR", "aVL", "aVF")


def derive_limb_leads(signal: np.ndarray, lead_names: Sequence[str]) -> tuple[np.ndarray, list[str], tuple[str, ...]]:
    """Add the limb leads a record lacks but leads I and II determine: III = II - I, aVR = -(I + II) / 2,
    aVL = I - II / 2, aVF = II - I / 2, exact for any ECG. Many devices store only the 8 independent leads (I, II,
    V1-V6). `signal` (samples, n_leads) with one name per column -> (signal with the derived columns appended, their
    names, the derived leads in standard order); unchanged where the record lacks I or II, has all four, or has a
    lead of a name we do not know (perhaps a misnamed limb lead: such a record is left for the caller to refuse)."""
    canonical = {}
    for index, name in enumerate(lead_names):
        try:
            canonical.setdefault(canonical_lead_name(name), index)
        except UnknownLeadError:
            if not is_extra_lead(name):
                return np.asarray(signal), list(lead_names), ()
    missing = [lead for lead in DERIVED_LIMB_LEADS if lead not in canonical]
    if not missing or "I" not in canonical or "II" not in canonical:
        return np.asarray(signal), list(lead_names), ()
    signal = np.asarray(signal)
    lead_i, lead_ii = signal[:, canonical["I"]], signal[:, canonical["II"]]
    formulas = {"III": lead_ii - lead_i, "aVR": -(lead_i + lead_ii) / 2, "aVL": lead_i - lead_ii / 2,
                "aVF": lead_ii - lead_i / 2}
    derived = np.stack([formulas[lead] for lead in missing], axis=1)
    return np.concatenate([signal, derived], axis=1), [*lead_names, *missing], tuple(missing)
