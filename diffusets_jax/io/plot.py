"""ECG figures: the clinical 12-lead sheet, real/generated pairs and the heart-rate scatter; metric bars with
intervals for experiment reports.

The 12-lead sheet follows the standard printout a cardiologist reads: 3 rows x 4 columns of 2.5 s each
(I, aVR, V1, V4 / II, aVL, V2, V5 / III, aVF, V3, V6, each column showing its own 2.5 s window of the same
10 s), a 10 s lead II rhythm strip below, a 1 mV x 200 ms calibration pulse at the start of every row, on
pink millimetre paper with bold 5 mm lines, at exactly 25 mm/s and 10 mm/mV: the figure size is derived from
millimetres and the sheet's axes map one data unit to one millimetre of paper, so a printout at 100 % (or the
PNG viewed at its dpi) can be measured with calipers.

Figures are built with `matplotlib.figure.Figure` and the Agg canvas directly (no pyplot global state), so they
are safe to make in loops and threads and are freed by garbage collection. PNGs are written atomically.

Signals sampled below `display_fs` (the model's 102.4 Hz) are drawn after polyphase interpolation to 500 Hz:
the 1024-sample signal is band-limited to 51.2 Hz, so this is its faithful reconstruction, whereas straight
lines between 9.8 ms-apart samples draw jagged QRS complexes. Each lead is drawn around its own baseline (its
median subtracted), as an electrocardiograph prints it. The data are not changed, only drawn.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from diffusets_jax.ecg.leads import STANDARD_LEADS
from diffusets_jax.ecg.shapes import ECG_RATE_HZ
from diffusets_jax.io.files import atomic_path

MM_PER_INCH = 25.4
MM_PER_SECOND = 25.0
MM_PER_MV = 10.0
DURATION_S = 10.0

# Standard 3 x 4 layout: LAYOUT[row][column] is the lead drawn there; each column covers 2.5 s.
LAYOUT: tuple[tuple[str, ...], ...] = (
    ("I", "aVR", "V1", "V4"),
    ("II", "aVL", "V2", "V5"),
    ("III", "aVF", "V3", "V6"),
)
COLUMN_SECONDS = DURATION_S / len(LAYOUT[0])

# Sheet geometry in mm. Rows are 35 mm apart (3.5 mV), as on common 3x4+1 printouts; the grid spans whole
# 5 mm squares.
CALIBRATION_MM = 10.0  # room for the 1 mV x 200 ms pulse before each row's trace
ROW_MM = 35.0
SHEET_WIDTH_MM = CALIBRATION_MM + DURATION_S * MM_PER_SECOND  # 260 mm
SHEET_HEIGHT_MM = 4 * ROW_MM  # 3 lead rows + rhythm strip = 140 mm
MARGIN_MM = 6.0
TITLE_MM = 14.0  # two title lines above each sheet
PROMPT_LINE_CHARS = 190  # characters of the 7 pt prompt line that fit across the sheet
PROMPT_LINE_MM = 3.2  # one more 7 pt prompt line (line spacing 1.2 = 2.96 mm, plus a little air)
FOOTER_MM = 7.0

# zlib's level for PNGs. Pillow's default, 6, took 0.21 of the 0.28 s a 12-lead sheet took to draw and write at
# 200 dpi (2141 x 1314 pixels); 3 takes 0.11 s for a file 7 % larger (694 against 648 KB), the same pixels.
PNG_COMPRESS_LEVEL = 3

MINOR_GRID_COLOR = "#f6c8c8"
MAJOR_GRID_COLOR = "#e48a8a"
TRACE_COLOR = "black"


def _check_ecg(ecg: Any, what: str) -> np.ndarray:
    ecg = np.asarray(ecg, dtype=np.float64)
    if ecg.ndim != 2 or ecg.shape[1] != len(STANDARD_LEADS) or ecg.shape[0] < 2:
        raise ValueError(
            f"{what}: expected one 10 s ECG of shape (samples, 12) in standard lead order "
            f"{', '.join(STANDARD_LEADS)}, got shape {ecg.shape}; a (12, samples) array needs transposing"
        )
    return ecg


def _display_signal(ecg: np.ndarray, fs: float, display_fs: float) -> tuple[np.ndarray, float]:
    """Band-limited interpolation for drawing only (see module docstring); no-op at or above `display_fs`.

    NaN samples (a lead the record lacks, a dropout) stay NaN, drawn as gaps: the interpolation runs on zeros
    there, and a 0 mV trace would read as a recorded flat lead."""
    if fs >= display_fs:
        return ecg, fs
    from scipy.signal import resample_poly

    ratio = Fraction(display_fs / fs).limit_denominator(1000)
    missing = ~np.isfinite(ecg)
    upsampled = resample_poly(np.nan_to_num(ecg), ratio.numerator, ratio.denominator, axis=0, padtype="line")
    if missing.any():  # each drawn sample takes the gap of the nearest sample it was interpolated from
        nearest = np.minimum(np.round(np.arange(len(upsampled)) * len(ecg) / len(upsampled)).astype(np.int64),
                             len(ecg) - 1)
        upsampled[missing[nearest]] = np.nan
    return upsampled, fs * ratio.numerator / ratio.denominator


def _number_text(value: Any, spec: str) -> str:
    """`value` formatted as a number, or as written when it is not one: a header comment such as `age: unknown`
    is shown as it is, where it used to make `plot` skip a readable ECG."""
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return str(value)


def conditions_text(conditions: Mapping[str, Any] | None,
                    max_prompt_chars: int | None = PROMPT_LINE_CHARS) -> tuple[str, str]:
    """(patient/sampler line, prompt line) for a title, from generation conditions such as
    `{"prompt": ..., "sex": 1, "age": 63, "heart_rate": 72, "seed": 0, "sampler": "ddpm 1000"}`; a prompt longer
    than `max_prompt_chars` (None: no limit) is cut with "..."."""
    if not conditions:
        return "", ""
    parts = []
    if "sex" in conditions:
        sex = conditions["sex"]
        parts.append("Sex " + ({1: "M", 0: "F"}.get(sex, str(sex)) if isinstance(sex, int | float) else str(sex)))
    if "age" in conditions:
        parts.append(f"Age {_number_text(conditions['age'], 'g')}")
    if "heart_rate" in conditions:
        parts.append(f"HR {_number_text(conditions['heart_rate'], '.0f')} bpm")
    for key, value in conditions.items():
        if key not in ("prompt", "sex", "age", "heart_rate"):
            parts.append(f"{key.replace('_', ' ')} {value}")
    prompt = str(conditions.get("prompt", "")).replace("\n", " | ")
    if max_prompt_chars is not None and len(prompt) > max_prompt_chars:
        prompt = prompt[: max_prompt_chars - 3] + "..."
    return "   ".join(parts), prompt


def prompt_lines_needed(conditions: Mapping[str, Any] | None) -> int:
    """How many title lines the whole prompt of `conditions` takes (plot_ecg's `prompt_lines` to show it uncut)."""
    _, prompt = conditions_text(conditions, max_prompt_chars=None)
    return max(1, len(_wrap_prompt(prompt)))


def _wrap_prompt(prompt: str) -> list[str]:
    # Report terms such as "ST-T" or "machine-read" stay whole.
    return textwrap.wrap(prompt, PROMPT_LINE_CHARS, break_on_hyphens=False)


def _draw_grid(ax) -> None:
    minor_x = np.arange(0.0, SHEET_WIDTH_MM + 0.5, 1.0)
    minor_y = np.arange(0.0, SHEET_HEIGHT_MM + 0.5, 1.0)
    major = lambda values: np.isclose(np.mod(values, 5.0), 0.0) | np.isclose(np.mod(values, 5.0), 5.0)

    def segments(xs, ys):
        vertical = [((x, 0.0), (x, SHEET_HEIGHT_MM)) for x in xs]
        horizontal = [((0.0, y), (SHEET_WIDTH_MM, y)) for y in ys]
        return vertical + horizontal

    ax.add_collection(LineCollection(
        segments(minor_x[~major(minor_x)], minor_y[~major(minor_y)]), colors=MINOR_GRID_COLOR, linewidths=0.35,
        zorder=0,
    ))
    ax.add_collection(LineCollection(
        segments(minor_x[major(minor_x)], minor_y[major(minor_y)]), colors=MAJOR_GRID_COLOR, linewidths=0.8,
        zorder=1,
    ))


def _calibration_pulse(ax, baseline_mm: float) -> None:
    """1 mV for 200 ms: 10 mm tall, 5 mm wide, centred in the calibration margin."""
    x = np.array([0.0, 2.5, 2.5, 7.5, 7.5, CALIBRATION_MM])
    y = baseline_mm + np.array([0.0, 0.0, MM_PER_MV, MM_PER_MV, 0.0, 0.0])
    ax.plot(x, y, color=TRACE_COLOR, linewidth=0.9, solid_joinstyle="miter", zorder=3)


def _without_offsets(ecg: np.ndarray) -> np.ndarray:
    """`ecg` `(samples, 12)` with each lead's median (over its recorded samples) subtracted, for drawing only.

    An electrocardiograph removes each lead's offset before printing: drawn as recorded, a lead a few mV off
    zero (an electrode's half-cell potential, an exporter that stores the offset) left its row and ran over the
    leads above or below. The median is the isoelectric level to within the beats' share of the record, and a
    constant shift changes no amplitude read from the trace (QRS, ST or T against its own baseline)."""
    finite = np.isfinite(ecg)
    counts = finite.sum(axis=0)
    medians = np.array([np.median(ecg[finite[:, lead], lead]) if counts[lead] else 0.0 for lead in range(ecg.shape[1])])
    return ecg - medians[None, :]


def _draw_sheet(ax, ecg: np.ndarray, fs: float, rhythm_lead: str, display_fs: float) -> None:
    """Draw one 12-lead sheet on `ax`, whose data coordinates are millimetres of paper; each lead's offset removed
    (`_without_offsets`)."""
    signal, signal_fs = _display_signal(_without_offsets(ecg), fs, display_fs)
    n = signal.shape[0]
    time_mm = CALIBRATION_MM + np.arange(n) / signal_fs * MM_PER_SECOND
    ax.set_xlim(0.0, SHEET_WIDTH_MM)
    ax.set_ylim(0.0, SHEET_HEIGHT_MM)
    ax.set_axis_off()
    _draw_grid(ax)
    label_style = dict(fontsize=7.5, fontweight="bold", color=TRACE_COLOR, zorder=4, va="bottom", ha="left")
    # Baselines a little below each row's middle: QRS complexes point up more often than down.
    baselines = [SHEET_HEIGHT_MM - ROW_MM * (row + 0.5) - 3.0 for row in range(4)]
    for row, leads in enumerate(LAYOUT):
        baseline = baselines[row]
        _calibration_pulse(ax, baseline)
        for column, lead in enumerate(leads):
            start = int(round(column * COLUMN_SECONDS * signal_fs))
            stop = min(n, int(round((column + 1) * COLUMN_SECONDS * signal_fs)) + 1)
            values = signal[start:stop, STANDARD_LEADS.index(lead)]
            ax.plot(time_mm[start:stop], baseline + values * MM_PER_MV, color=TRACE_COLOR, linewidth=0.7, zorder=3)
            x0 = CALIBRATION_MM + column * COLUMN_SECONDS * MM_PER_SECOND
            ax.text(x0 + 1.2, baseline + 11.0, lead, **label_style)
            if column:  # the short bar printers put where the leads change
                ax.plot([x0, x0], [baseline - 4.0, baseline + 4.0], color=TRACE_COLOR, linewidth=0.9, zorder=3)
    baseline = baselines[3]
    _calibration_pulse(ax, baseline)
    values = signal[:, STANDARD_LEADS.index(rhythm_lead)]
    ax.plot(time_mm, baseline + values * MM_PER_MV, color=TRACE_COLOR, linewidth=0.7, zorder=3)
    ax.text(CALIBRATION_MM + 1.2, baseline + 11.0, rhythm_lead, **label_style)


def _sheet_figure(n_sheets: int, title_mm: float = TITLE_MM) -> tuple[Figure, list]:
    """A figure of `n_sheets` stacked sheets whose axes are placed so 1 data unit = 1 mm of paper."""
    width_mm = SHEET_WIDTH_MM + 2 * MARGIN_MM
    block_mm = title_mm + SHEET_HEIGHT_MM
    height_mm = MARGIN_MM + n_sheets * block_mm + (n_sheets - 1) * MARGIN_MM + FOOTER_MM
    fig = Figure(figsize=(width_mm / MM_PER_INCH, height_mm / MM_PER_INCH), facecolor="white")
    FigureCanvasAgg(fig)
    axes = []
    for i in range(n_sheets):
        top_mm = MARGIN_MM + i * (block_mm + MARGIN_MM) + title_mm
        bottom_mm = height_mm - top_mm - SHEET_HEIGHT_MM
        axes.append(fig.add_axes((
            MARGIN_MM / width_mm, bottom_mm / height_mm, SHEET_WIDTH_MM / width_mm, SHEET_HEIGHT_MM / height_mm,
        )))
    return fig, axes


def _title(fig: Figure, ax, heading: str, conditions: Mapping[str, Any] | None, prompt_lines: int = 1) -> None:
    line1, prompt = conditions_text(conditions, max_prompt_chars=PROMPT_LINE_CHARS if prompt_lines == 1 else None)
    if prompt_lines > 1:
        lines = _wrap_prompt(prompt)
        if len(lines) > prompt_lines:
            lines = lines[: prompt_lines - 1] + [lines[prompt_lines - 1][: PROMPT_LINE_CHARS - 3] + "..."]
        prompt = "\n".join(lines)
    box = ax.get_position()
    x = box.x0
    y_mm_above = lambda mm: box.y1 + mm / (fig.get_figheight() * MM_PER_INCH)
    head = "   ".join(part for part in (heading, line1) if part)
    fig.text(x, y_mm_above(7.5 + (prompt_lines - 1) * PROMPT_LINE_MM), head, fontsize=9, fontweight="bold",
             va="bottom", ha="left")
    if prompt:
        fig.text(x, y_mm_above(2.0), prompt, fontsize=7, va="bottom", ha="left", color="#222222", linespacing=1.2)


def _footer(fig: Figure, fs: float, extra: str = "") -> None:
    text = f"{MM_PER_SECOND:g} mm/s   {MM_PER_MV:g} mm/mV   recorded at {fs:g} Hz   {extra}".rstrip()
    fig.text(MARGIN_MM / (fig.get_figwidth() * MM_PER_INCH), 2.0 / (fig.get_figheight() * MM_PER_INCH), text,
             fontsize=7, va="bottom", ha="left", color="#444444")


def save_png(fig: Figure, path: str | os.PathLike, dpi: int = 200,
             metadata: Mapping[str, str | None] | None = None) -> str:
    """Write `fig` as a PNG at `dpi` atomically (`io.files.atomic_path`). Never crops: the size in pixels is
    the figure size in inches times `dpi`, which keeps the mm scale. `metadata`: PNG text chunks, as matplotlib
    takes them (`{"Software": None}` writes none)."""
    path = os.fspath(path)
    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        fig.savefig(stream, format="png", dpi=dpi, facecolor=fig.get_facecolor(), metadata=metadata,
                    pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
    return path


def plot_ecg(
    ecg: Any,
    fs: float = ECG_RATE_HZ,
    *,
    title: str = "",
    conditions: Mapping[str, Any] | None = None,
    path: str | os.PathLike | None = None,
    dpi: int = 200,
    rhythm_lead: str = "II",
    display_fs: float = 500.0,
    prompt_lines: int = 1,
) -> Figure:
    """Clinical 12-lead sheet of one 10 s ECG `(samples, 12)` in mV, standard lead order, sampled at `fs`
    (1024 samples = 102.4 Hz). `conditions` (prompt, sex, age, heart_rate, seed, ...) go in the title; the prompt
    wraps over `prompt_lines` lines (the figure grows by PROMPT_LINE_MM per extra line; `prompt_lines_needed`
    says how many show it uncut). Saves a PNG when `path` is given; returns the figure."""
    ecg = _check_ecg(ecg, "plot_ecg")
    _check_duration(ecg, fs, "plot_ecg")
    if rhythm_lead not in STANDARD_LEADS:
        raise ValueError(f"rhythm_lead {rhythm_lead!r} is not one of {', '.join(STANDARD_LEADS)}")
    if not isinstance(prompt_lines, int) or prompt_lines < 1:
        raise ValueError(f"prompt_lines must be a positive integer, got {prompt_lines!r}")
    fig, (ax,) = _sheet_figure(1, TITLE_MM + (prompt_lines - 1) * PROMPT_LINE_MM)
    _draw_sheet(ax, ecg, fs, rhythm_lead, display_fs)
    _title(fig, ax, title, conditions, prompt_lines)
    _footer(fig, fs)
    if path is not None:
        save_png(fig, path, dpi)
    return fig


def _check_duration(ecg: np.ndarray, fs: float, what: str) -> None:
    seconds = ecg.shape[0] / fs
    if not 9.5 <= seconds <= 10.5:
        raise ValueError(
            f"{what}: {ecg.shape[0]} samples at {fs:g} Hz is {seconds:.2f} s, but a sheet shows 10 s (1024 samples "
            "at 102.4 Hz, 5000 at 500 Hz): draw 10-second records (an fs given by hand must be the rate of the samples)"
        )


def plot_pair(
    real: Any,
    generated: Any,
    fs: float = ECG_RATE_HZ,
    *,
    generated_fs: float | None = None,
    conditions: Mapping[str, Any] | None = None,
    title: str = "",
    path: str | os.PathLike | None = None,
    dpi: int = 200,
    display_fs: float = 500.0,
    labels: tuple[str, str] = ("Real", "Generated"),
) -> Figure:
    """A real ECG above a generated one (same scale), e.g. a test-set record and the ECG generated from
    its report and patient data. `fs` is the real ECG's rate; `generated_fs` defaults to `fs`. `labels`: the two
    sheets' headings (e.g. a reference recording and its reconstruction)."""
    real = _check_ecg(real, "plot_pair real")
    generated = _check_ecg(generated, "plot_pair generated")
    generated_fs = fs if generated_fs is None else generated_fs
    _check_duration(real, fs, "plot_pair real")
    _check_duration(generated, generated_fs, "plot_pair generated")
    fig, (ax_real, ax_generated) = _sheet_figure(2)
    _draw_sheet(ax_real, real, fs, "II", display_fs)
    _draw_sheet(ax_generated, generated, generated_fs, "II", display_fs)
    _title(fig, ax_real, " - ".join(p for p in (title, labels[0]) if p), conditions)
    _title(fig, ax_generated, " - ".join(p for p in (title, labels[1]) if p), None)
    _footer(fig, fs, "" if generated_fs == fs else f"(generated at {generated_fs:g} Hz)")
    if path is not None:
        save_png(fig, path, dpi)
    return fig


def _heart_rate_panel(ax, input_hr: Any, measured_hr: Any, title: str) -> None:
    x = np.asarray(input_hr, dtype=np.float64).reshape(-1)
    y = np.asarray(measured_hr, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"plot_heart_rate_scatter: {x.size} input rates but {y.size} measured rates")
    ok = np.isfinite(x) & np.isfinite(y)
    # A record without a conditioning rate (another generator's samples may give none) is not an unmeasurable ECG.
    failed = int(np.sum(np.isfinite(x) & ~np.isfinite(y)))
    no_condition = int(np.sum(~np.isfinite(x)))
    if ok.any():
        lo = float(min(x[ok].min(), y[ok].min()))
        hi = float(max(x[ok].max(), y[ok].max()))
    else:
        lo, hi = 40.0, 160.0
    pad = 0.05 * max(hi - lo, 1.0)
    lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], color="#c0392b", linewidth=1.0, linestyle="--", label="identity", zorder=1)
    ax.scatter(x[ok], y[ok], s=10, alpha=0.6, color="#1f4e79", edgecolors="none", zorder=2)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel("conditioning heart rate (bpm)")
    ax.set_ylabel("heart rate measured on generated ECG (bpm)")
    mae = float(np.mean(np.abs(x[ok] - y[ok]))) if ok.any() else float("nan")
    ax.set_title(f"{title}\nMAE {mae:.2f} bpm   n = {int(ok.sum())}   unmeasurable {failed}"
                 + (f"   no condition {no_condition}" if no_condition else ""), fontsize=10)
    ax.grid(True, color="#dddddd", linewidth=0.5)
    ax.legend(loc="upper left", frameon=False, fontsize=8)


def plot_heart_rate_scatter(
    input_hr: Sequence[float] | np.ndarray | None,
    measured_hr: Sequence[float] | np.ndarray | None,
    *,
    panels: Sequence[tuple[str, Any, Any]] | None = None,
    path: str | os.PathLike | None = None,
    dpi: int = 150,
    title: str = "Heart rate: condition vs generated",
) -> Figure:
    """Scatter of conditioning heart rate vs heart rate measured on the generated ECG (the paper's Fig. 2A),
    with the identity line and the MAE in the title. NaN in `measured_hr` marks records where no rate could be
    measured: they are left out of the plot and the MAE, and counted in the title.

    `panels`: `(title, input_hr, measured_hr)` per model, drawn side by side (Fig. 2A compares a U-Net with and
    without patient information); then `input_hr` and `measured_hr` are ignored.
    """
    panels = list(panels) if panels else [(title, input_hr, measured_hr)]
    fig = Figure(figsize=(5.0 * len(panels), 5.0), facecolor="white")
    FigureCanvasAgg(fig)
    for i, (panel_title, x, y) in enumerate(panels):
        _heart_rate_panel(fig.add_subplot(1, len(panels), i + 1), x, y, panel_title)
    fig.tight_layout()
    if path is not None:
        save_png(fig, path, dpi)
    return fig


def plot_condition_bars(rows: Sequence[Mapping[str, Any]], *, path: str | os.PathLike | None = None,
                        dpi: int = 150) -> Figure:
    """Per-condition precision / recall / F1 (grouped bars) and heart-rate MAE (the paper's Fig. 2E layout);
    conditions without a value are drawn empty and marked n/a."""
    names = [str(r["condition"]) for r in rows]
    fig = Figure(figsize=(max(6.0, 0.7 * len(names) + 2.0), 6.0), facecolor="white")
    FigureCanvasAgg(fig)
    top, bottom = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    x = np.arange(len(names))
    width = 0.27
    for offset, (key, color) in enumerate((("precision", "#1f4e79"), ("recall", "#2e86c1"), ("f1", "#85c1e9"))):
        values = [r.get(key) for r in rows]
        top.bar(x + (offset - 1) * width, [np.nan if v is None else v for v in values], width, label=key, color=color)
    for i, r in enumerate(rows):
        if r.get("f1") is None:
            top.text(i, 0.02, "n/a", ha="center", fontsize=7, color="#777777")
    top.set_ylim(0, 1.05)
    top.set_xticks(x, names, fontsize=8)
    top.set_ylabel("CLIP-feature manifold")
    top.legend(frameon=False, fontsize=8, ncols=3)
    hr = [r.get("heart_rate_mae_bpm") for r in rows]
    bottom.bar(x, [np.nan if v is None else v for v in hr], 0.6, color="#7d3c98")
    bottom.set_xticks(x, [f"{n}\n(n={r.get('records', 0)})" for n, r in zip(names, rows, strict=True)], fontsize=8)
    bottom.set_ylabel("heart-rate MAE (bpm)")
    for ax in (top, bottom):
        ax.grid(True, axis="y", color="#dddddd", linewidth=0.5)
    fig.tight_layout()
    if path is not None:
        save_png(fig, path, dpi)
    return fig


def plot_metric_intervals(
    panels: Sequence[tuple[str, Mapping[str, Mapping[str, tuple[float, float, float]]]]],
    metrics: Sequence[tuple[str, str]],
    *,
    path: str | os.PathLike | None = None,
    dpi: int = 150,
    ylabel: str = "",
) -> Figure:
    """Grouped bars with interval whiskers, one panel per `(title, {series: {metric: (value, low, high)}})` entry
    of `panels`: metric groups along x (`metrics`: `(key, label)` pairs), one bar per series (e.g. a training arm)
    with its interval (e.g. a bootstrap 95 % CI). A NaN value leaves a gap; a NaN bound draws no whisker on that
    side. Metrics are assumed in [0, 1] (the y axis)."""
    if not panels:
        raise ValueError("plot_metric_intervals: no panels to draw")
    series = list(dict.fromkeys(name for _, values in panels for name in values))
    colors = ["#1f4e79", "#c0392b", "#2e8b57", "#b8860b", "#6a3d9a", "#555555"]
    fig = Figure(figsize=(max(6.0, 1.1 * len(metrics) * max(len(series), 2) * 0.45 + 2.0), 3.0 * len(panels) + 0.6),
                 facecolor="white")
    FigureCanvasAgg(fig)
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(metrics), dtype=np.float64)
    for row, (title, values) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, row + 1)
        for i, name in enumerate(series):
            triples = np.array([values.get(name, {}).get(key, (np.nan, np.nan, np.nan)) for key, _ in metrics],
                               dtype=np.float64).reshape(len(metrics), 3)
            value, low, high = triples.T
            errors = np.nan_to_num(np.vstack([value - low, high - value]), nan=0.0).clip(min=0.0)
            ax.bar(x + (i - (len(series) - 1) / 2) * width, value, width * 0.92, yerr=errors, capsize=2.5,
                   color=colors[i % len(colors)], label=name, error_kw={"elinewidth": 0.8, "ecolor": "#222222"})
        ax.set_xticks(x, [label for _, label in metrics], fontsize=9)
        ax.set_ylim(0.0, 1.05)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(True, axis="y", color="#dddddd", linewidth=0.5)
        ax.set_axisbelow(True)
        if row == 0:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, 1.32), ncol=len(series), frameon=False, fontsize=8)
    fig.tight_layout()
    if path is not None:
        save_png(fig, path, dpi)
    return fig


def _draw_record(record: str, name: str, path: str | os.PathLike, dpi: int) -> str:
    """Draw WFDB record `record` titled `name` into `path`; the PNG's path. ValueError or OSError when the record
    cannot be read or drawn. Module-level, so that a worker process (`worker_processes`) runs it."""
    from diffusets_jax.io.wfdb_out import read_record

    ecg = read_record(record)
    conditions = {key: value for key, value in ecg.conditions.items() if key != "generator"}
    # Missing samples (NaN: a dropout, a lead the recorder lost) are drawn as gaps, not as a 0 mV flat trace.
    fig = plot_ecg(ecg.signal, ecg.fs, title=name, conditions=conditions)
    return save_png(fig, path, dpi)


def plot_wfdb_records(
    records: Sequence[str | os.PathLike], out_dir: str | os.PathLike, dpi: int = 200, *, overwrite: bool = False
) -> dict[str, Any]:
    """Draw each 12-lead WFDB record (`path` with or without `.hea`; ours or any 10 s 12-lead record) as
    `out_dir/NAME.png`, with the conditions from its header comments in the title. A record that cannot be
    read or drawn is skipped and reported: `{"written": [png paths], "skipped": {record: reason}}`.

    `out_dir` is claimed like every output folder (`io.run_dir.output_dir`): the same command rerun redraws into
    it, anything else there is refused unless `overwrite`. When no record exists at all (a typo), nothing is
    created and the error names the first one; when none can be drawn, ValueError with the count and the first
    reason, and `out_dir` is left as it was (a folder this run created is removed).
    """
    from diffusets_jax.data.records import record_base
    from diffusets_jax.io.files import remove_temporaries_in
    from diffusets_jax.io.names import distinct_names
    from diffusets_jax.io.plot_workers import plot_workers
    from diffusets_jax.io.run_dir import output_dir

    # One path given twice is one record, drawn once: the problems below are keyed by the path as given, so
    # reporting the second as "listed twice" marked the first too, and `plot rec rec` drew nothing.
    records = list(dict.fromkeys(os.fspath(record) for record in records))
    headers = {record: record_base(record) + ".hea" for record in records}
    # A folder given as a record is named as given: `wfdb/` was reported as "wfdb.hea is a directory".
    problems = {record: (f"{record if os.path.isdir(record) else header} is a directory, not a WFDB record"
                         if os.path.isdir(header) or os.path.isdir(record) else f"{header} does not exist")
                for record, header in headers.items() if not os.path.isfile(header)}
    if problems and len(problems) == len(records):
        first = next(iter(problems.values()))
        raise FileNotFoundError(first + (f" (nor any of the other {len(records) - 1} records)" if len(records) > 1
                                         else "") + ": give WFDB record paths (NAME or NAME.hea)")
    # A record listed twice is drawn once; records of one name in several folders get names that tell them apart
    # (`io.names.distinct_names`), where they used to overwrite one another's PNG.
    # Another file of a record already listed (`wfdb/*` lists each record's .dat and .hea) is that record, not a
    # record listed twice: left out without a word, where it was reported as one skipped record in two.
    drawn: dict[str, str] = {}  # the record's real path (without extension) -> the record as given
    other_files: set[str] = set()
    for record in records:
        if record not in problems:
            key = os.path.realpath(record_base(record))
            if key not in drawn:
                drawn[key] = record
            elif record_base(record) == record_base(drawn[key]):
                other_files.add(record)
            else:
                problems[record] = f"listed twice (also as {drawn[key]})"
    names = dict(zip(drawn.values(), distinct_names(list(drawn)), strict=True))
    settings = {"records": [os.path.abspath(record) for record in records], "dpi": dpi}
    written, skipped = [], dict(problems)
    with output_dir(out_dir, command="plot", settings=settings, overwrite=overwrite, flag="--out-dir",
                    reads=[("record", header) for header in headers.values()]) as run:
        to_draw = [record for record in records if record not in problems and record not in other_files]
        with plot_workers(len(to_draw)) as plots:  # many records: one process per core
            drawing = [plots.submit(_draw_record, record, names[record], run.path / f"{names[record]}.png", dpi)
                       for record in to_draw]
            for record, sheet in zip(to_draw, drawing, strict=True):
                try:
                    written.append(sheet.result())
                except (OSError, ValueError) as err:
                    skipped[record] = str(err)
        if not written:  # raised inside the claim, so the folder this run made goes again (`output_dir`)
            first = next(record for record in records if record in skipped)
            raise ValueError(f"no record could be plotted: all {len(records)} were skipped (the first, {first}: "
                             f"{' '.join(skipped[first].split())}); give readable 12-lead WFDB records (NAME or "
                             "NAME.hea)")
        # A half-written sheet of a killed run of this command (a PNG's temporary, `io.files.atomic_path`): its PNG
        # was drawn again just now, so the temporary is ours to remove, in the folder this run holds.
        remove_temporaries_in(run.path, [f"{names[record]}.png" for record in to_draw])
        run.mark_complete(written=len(written), skipped=len(skipped))
    if run.path != run.final:  # replaced as a whole: the PNGs now live in the final folder
        written = [os.path.join(os.fspath(run.final), os.path.basename(path)) for path in written]
    return {"written": written, "skipped": skipped}


def plot_diagnosis(
    timesteps: Sequence[int],
    x0_mse: Mapping[str, Sequence[float]],
    eps_mse: Mapping[str, Sequence[float]],
    latents: Mapping[str, np.ndarray],
    *,
    references: Sequence[str] = (),
    path: str | os.PathLike | None = None,
    dpi: int = 150,
    title: str = "",
) -> Figure:
    """The U-Net diagnosis (`experiments.diagnose`): x0- and eps-MSE per element against the timestep on log
    scales, one line per series of `x0_mse` / `eps_mse` (`{label: values per t}`; the labels in `references` drawn
    as grey dashed reference lines), and box plots of `latents` (`{label: (n, length, C)}`) per channel: the
    boxes span the quartiles, the whiskers the 1st to 99th percentiles and the ticks the min and max."""
    t = np.asarray(timesteps, dtype=np.float64)
    fig = Figure(figsize=(16.0, 4.8), facecolor="white")
    FigureCanvasAgg(fig)
    reference_styles = [dict(color="#555555", linestyle="--"), dict(color="#000000", linestyle=":")]
    unet_colors = ["#1f4e79", "#c0392b", "#27ae60"]
    for column, (values, ylabel) in enumerate(((x0_mse, "x0 MSE per element"), (eps_mse, "eps MSE per element"))):
        ax = fig.add_subplot(1, 3, column + 1)
        unet_index = 0
        for label, series in values.items():
            y = np.asarray(series, dtype=np.float64)
            if label in references:
                style = reference_styles[list(references).index(label) % len(reference_styles)]
                ax.plot(t, y, marker=".", linewidth=1.2, label=label, **style)
            else:
                ax.plot(t, y, marker="o", markersize=4, linewidth=1.8, label=label,
                        color=unet_colors[unet_index % len(unet_colors)])
                unet_index += 1
        ax.set_yscale("log")
        ax.set_xlabel("timestep t")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", color="#dddddd", linewidth=0.5)
        ax.legend(frameon=False, fontsize=7)
    ax = fig.add_subplot(1, 3, 3)
    labels = list(latents)
    channels = int(np.shape(next(iter(latents.values())))[-1]) if labels else 0
    width = 0.8 / max(len(labels), 1)
    box_colors = ["#bbbbbb"] + unet_colors
    for i, label in enumerate(labels):
        flat = np.asarray(latents[label], dtype=np.float64).reshape(-1, channels)
        positions = np.arange(channels) + (i - (len(labels) - 1) / 2) * width
        parts = ax.boxplot([flat[:, c] for c in range(channels)], positions=positions, widths=width * 0.9,
                           whis=(1, 99), showfliers=False, patch_artist=True)
        for box in parts["boxes"]:
            box.set_facecolor(box_colors[i % len(box_colors)])
            box.set_alpha(0.8)
        ax.scatter(np.repeat(positions, 2), np.stack([flat.min(axis=0), flat.max(axis=0)], axis=1).reshape(-1),
                   marker="_", s=40, color=box_colors[i % len(box_colors)], zorder=3)
        ax.plot([], [], color=box_colors[i % len(box_colors)], linewidth=6, label=label)
    ax.set_xticks(np.arange(channels))
    ax.set_xticklabels([f"channel {c}" for c in range(channels)])
    ax.set_ylabel("latent value (scaled)")
    ax.grid(True, axis="y", color="#dddddd", linewidth=0.5)
    ax.legend(frameon=False, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if path is not None:
        save_png(fig, path, dpi)
    return fig
