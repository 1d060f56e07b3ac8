"""Clinical 12-lead plots: files written, exact mm scale, sensible errors."""

import os

import numpy as np
import pytest
from PIL import Image

from diffusets_jax.io import plot
from diffusets_jax.io.plot import plot_ecg, plot_heart_rate_scatter, plot_pair, save_png


def synthetic_ecg(samples: int = 1024) -> np.ndarray:
    t = np.arange(samples) / samples * 10.0
    beats = sum(np.exp(-0.5 * ((t - c) / 0.02) ** 2) for c in np.arange(0.4, 10.0, 0.8))
    return beats[:, None] * np.linspace(-1.0, 1.5, 12)[None, :]


def expected_pixels(mm: float, dpi: int) -> int:
    return int(round(mm / 25.4 * dpi))


def test_sheet_png_has_the_mm_derived_size(tmp_path):
    dpi = 150
    fig = plot_ecg(synthetic_ecg(), 102.4, title="Generated", conditions={"sex": 1, "age": 63, "heart_rate": 75},
                   path=tmp_path / "ecg.png", dpi=dpi)
    width_mm = plot.SHEET_WIDTH_MM + 2 * plot.MARGIN_MM
    height_mm = plot.MARGIN_MM + plot.TITLE_MM + plot.SHEET_HEIGHT_MM + plot.FOOTER_MM
    assert fig.get_figwidth() * 25.4 == pytest.approx(width_mm)
    assert fig.get_figheight() * 25.4 == pytest.approx(height_mm)
    with Image.open(tmp_path / "ecg.png") as image:
        assert image.format == "PNG"
        assert abs(image.size[0] - expected_pixels(width_mm, dpi)) <= 1
        assert abs(image.size[1] - expected_pixels(height_mm, dpi)) <= 1
        pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    # Pink paper and black ink are both present.
    pink = (pixels[..., 0] > 200) & (pixels[..., 1] < 210) & (pixels[..., 2] < 210)
    black = pixels.sum(axis=-1) < 150
    assert pink.mean() > 0.01 and black.mean() > 0.001


def test_25_mm_per_second_and_10_mm_per_mv_on_paper():
    dpi = 100
    fig = plot_ecg(synthetic_ecg(), 102.4, dpi=dpi)
    fig.set_dpi(dpi)
    ax = fig.axes[0]
    to_pixels = ax.transData.transform
    px_per_mm = dpi / 25.4
    (x0, y0), (x1, y1) = to_pixels([(0.0, 0.0), (25.0, 10.0)])
    assert x1 - x0 == pytest.approx(25.0 * px_per_mm, rel=1e-6)  # 1 s of signal
    assert y1 - y0 == pytest.approx(10.0 * px_per_mm, rel=1e-6)  # 1 mV
    # The drawn lead I trace (first column) spans 2.5 s = 62.5 mm and its peak is 10 mm/mV above baseline.
    traces = [line for line in ax.get_lines() if len(line.get_xdata()) > 50]
    lead_i = traces[0]
    x = np.asarray(lead_i.get_xdata())
    assert x[0] == pytest.approx(plot.CALIBRATION_MM)
    assert x[-1] - x[0] == pytest.approx(2.5 * plot.MM_PER_SECOND, abs=0.1)
    y = np.asarray(lead_i.get_ydata())
    baseline = np.median(y)
    assert y.min() - baseline == pytest.approx(-1.0 * plot.MM_PER_MV, abs=0.3)  # lead I peaks at -1 mV
    # 3 x 4 leads + rhythm strip.
    assert len(traces) == 13
    labels = [text.get_text() for text in ax.texts]
    assert labels == ["I", "aVR", "V1", "V4", "II", "aVL", "V2", "V5", "III", "aVF", "V3", "V6", "II"]


def test_any_sampling_rate_for_ten_seconds(tmp_path):
    plot_ecg(synthetic_ecg(5000), 500, path=tmp_path / "500.png", dpi=50)
    assert (tmp_path / "500.png").stat().st_size > 1000


def test_pair_and_scatter_are_written(tmp_path):
    fig = plot_pair(synthetic_ecg(5000), synthetic_ecg(), 500, generated_fs=102.4,
                    conditions={"prompt": "Sinus rhythm", "heart_rate": 75}, path=tmp_path / "pair.png", dpi=50)
    assert len(fig.axes) == 2
    with Image.open(tmp_path / "pair.png") as image:
        assert image.size[1] > 1.8 * expected_pixels(plot.SHEET_HEIGHT_MM, 50)
    condition = np.array([60.0, 80.0, 100.0, 120.0])
    measured = np.array([62.0, 79.0, np.nan, 110.0])
    fig = plot_heart_rate_scatter(condition, measured, path=tmp_path / "hr.png")
    title = fig.axes[0].get_title()
    assert "MAE 4.33 bpm" in title and "n = 3" in title and "unmeasurable 1" in title
    assert "no condition" not in title
    # A record with no conditioning rate (another generator's samples) is not an unmeasurable ECG.
    title = plot_heart_rate_scatter(np.array([60.0, np.nan, np.nan]), np.array([61.0, 80.0, np.nan])).axes[0].get_title()
    assert "n = 1" in title and "unmeasurable 0" in title and "no condition 2" in title
    assert (tmp_path / "hr.png").stat().st_size > 1000


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="transposing"):
        plot_ecg(synthetic_ecg().T)
    with pytest.raises(ValueError, match="is 2.05 s, but a sheet shows 10 s .*: draw 10-second records"):
        plot_ecg(synthetic_ecg(), fs=500)
    with pytest.raises(ValueError, match="rhythm_lead"):
        plot_ecg(synthetic_ecg(), rhythm_lead="X")
    with pytest.raises(ValueError, match="measured rates"):
        plot_heart_rate_scatter([1.0, 2.0], [1.0])


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    fig = plot_heart_rate_scatter([60.0], [61.0])
    save_png(fig, tmp_path / "a.png")
    save_png(fig, tmp_path / "a.png")
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_plot_command_draws_records_and_lists_bad_ones(tmp_path, capsys):
    import json

    from diffusets_jax.cli import main
    from diffusets_jax.io.wfdb_out import write_record

    write_record(tmp_path / "gen_0", synthetic_ecg(), conditions={"prompt": "Sinus rhythm.", "sex": 0, "age": 50})
    (tmp_path / "broken.hea").write_text("not a header\n")
    code = main(["plot", str(tmp_path / "gen_0.hea"), str(tmp_path / "broken"), "--out-dir", str(tmp_path / "png"),
                 "--dpi", "40"])
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert code == 0 and summary["written"] == 1 and list(summary["skipped"]) == [str(tmp_path / "broken")]
    assert "broken.hea cannot be read as a WFDB header" in captured.err
    assert (tmp_path / "png" / "gen_0.png").stat().st_size > 1000


@pytest.mark.parametrize("workers", [0, 2])
def test_the_plot_command_draws_as_many_records_in_worker_processes(tmp_path, monkeypatch, workers):
    """Thousands of records go to one worker process per core (`io.plot_workers`): the same PNGs, and a record a
    worker cannot read is skipped with the same reason."""
    from diffusets_jax.io import plot_workers
    from diffusets_jax.io.wfdb_out import write_record

    records = []
    for i in range(3):
        write_record(tmp_path / f"gen_{i}", synthetic_ecg() * (1 + i), conditions={"prompt": f"Sinus rhythm {i}."})
        records.append(str(tmp_path / f"gen_{i}"))
    (tmp_path / "broken.hea").write_text("not a header\n")
    records.insert(1, str(tmp_path / "broken"))
    here = plot.plot_wfdb_records(records, tmp_path / "here", dpi=40)
    monkeypatch.setattr(plot_workers, "worker_count", lambda sheets: workers)
    pooled = plot.plot_wfdb_records(records, tmp_path / "pool", dpi=40)
    assert [os.path.basename(p) for p in pooled["written"]] == ["gen_0.png", "gen_1.png", "gen_2.png"]
    assert [os.path.dirname(p) for p in pooled["written"]] == [str(tmp_path / "pool")] * 3
    assert pooled["skipped"] == here["skipped"] and list(pooled["skipped"]) == [str(tmp_path / "broken")]
    for name in ("gen_0.png", "gen_1.png", "gen_2.png"):
        assert (tmp_path / "pool" / name).read_bytes() == (tmp_path / "here" / name).read_bytes()


def unplottable_records(folder):
    """Two records that exist but cannot be drawn: a header that is not WFDB, and one whose signal file is gone."""
    from diffusets_jax.io.wfdb_out import write_record

    folder.mkdir()
    (folder / "broken.hea").write_text("not a header\n")
    write_record(folder / "lost", synthetic_ecg())
    for data in folder.glob("lost.*"):
        if data.suffix != ".hea":
            data.unlink()
    return [str(folder / "broken"), str(folder / "lost.hea")]


def test_a_plot_that_draws_nothing_is_one_line_exit_2_and_removes_the_folders_it_made(tmp_path, capsys):
    """Every record failing was exit 1 with a line per record, and left the claimed --out-dir behind, empty but for
    its run record (and the parents it made)."""
    from diffusets_jax.cli import main

    records = unplottable_records(tmp_path / "records")
    code = main(["plot", *records, "--out-dir", str(tmp_path / "new" / "png"), "--dpi", "40"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "", captured
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    assert (f"no record could be plotted: all 2 were skipped (the first, {records[0]}: {records[0]}.hea cannot be "
            "read as a WFDB header") in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_plot_that_draws_nothing_leaves_a_folder_it_did_not_create_as_it_was(tmp_path, capsys, overwrite):
    """An empty folder the user made is claimed (run record, lock file): those go again and the folder stays. A
    folder of the user's files given with --overwrite is replaced only by a run that succeeds."""
    from diffusets_jax.cli import main

    records = unplottable_records(tmp_path / "records")
    out = tmp_path / "mine"
    out.mkdir()
    if overwrite:
        (out / "notes.txt").write_text("the user's")
    code = main(["plot", *records, "--out-dir", str(out), "--dpi", "40", *(["--overwrite"] if overwrite else [])])
    assert code == 2 and "no record could be plotted: all 2 were skipped" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "records"]
    assert {p.name: p.read_text() for p in out.iterdir()} == ({"notes.txt": "the user's"} if overwrite else {})


def test_a_header_comment_that_is_not_a_number_is_shown_not_a_reason_to_skip(tmp_path, capsys):
    """`# age: unknown` in a record's header made `plot` skip a readable ECG ("could not convert string to float")."""
    from diffusets_jax.cli import main
    from diffusets_jax.io.wfdb_out import write_record

    write_record(tmp_path / "rec", synthetic_ecg(), conditions={"prompt": "Sinus rhythm.", "sex": 1, "age": "unknown",
                                                               "heart_rate": "n/a"})
    assert main(["plot", str(tmp_path / "rec"), "--out-dir", str(tmp_path / "png"), "--dpi", "40"]) == 0
    assert (tmp_path / "png" / "rec.png").is_file()
    assert plot.conditions_text({"sex": 1, "age": "unknown", "heart_rate": "n/a"})[0] == "Sex M   Age unknown   HR n/a bpm"


def test_records_of_one_name_in_two_folders_get_a_png_each(tmp_path):
    """Two runs' `wfdb/sample_0` drawn into one folder: the second PNG replaced the first, and the summary said 2
    were written. A record listed twice is drawn once and reported."""
    from diffusets_jax.io.wfdb_out import write_record

    for run, scale in (("run_a", 1.0), ("run_b", 2.0)):
        write_record(tmp_path / run / "wfdb" / "sample_0", scale * synthetic_ecg())
    records = [tmp_path / "run_a" / "wfdb" / "sample_0", tmp_path / "run_b" / "wfdb" / "sample_0.hea",
               tmp_path / "run_a" / "wfdb" / ".." / "wfdb" / "sample_0"]
    summary = plot.plot_wfdb_records(records, tmp_path / "png", dpi=40)
    assert sorted(p.name for p in (tmp_path / "png").glob("*.png")) == ["run_a-wfdb-sample_0.png",
                                                                           "run_b-wfdb-sample_0.png"]
    assert len(summary["written"]) == 2
    assert summary["skipped"] == {str(records[2]): f"listed twice (also as {records[0]})"}


def test_a_records_other_files_are_that_record_not_one_listed_twice(tmp_path):
    """`plot wfdb/*` lists each record's .dat and .hea: every record was drawn, and reported skipped as "listed
    twice" too, so the summary said half the records were skipped."""
    from diffusets_jax.io.wfdb_out import write_record

    for name in ("a", "b"):
        write_record(tmp_path / "wfdb" / name, synthetic_ecg())
    files = sorted(str(p) for p in (tmp_path / "wfdb").iterdir())  # a.dat a.hea b.dat b.hea, as the shell's glob
    summary = plot.plot_wfdb_records(files, tmp_path / "png", dpi=40)
    assert sorted(os.path.basename(p) for p in summary["written"]) == ["a.png", "b.png"]
    assert summary["skipped"] == {}


def test_one_path_given_twice_is_drawn_once(tmp_path):
    """`plot rec rec`: the second was marked "listed twice" under the path they share, which left the first out too,
    and the run drew nothing ("no record could be plotted")."""
    from diffusets_jax.io.wfdb_out import write_record

    write_record(tmp_path / "wfdb" / "a", synthetic_ecg())
    record = str(tmp_path / "wfdb" / "a.hea")
    summary = plot.plot_wfdb_records([record, record], tmp_path / "png", dpi=40)
    assert [os.path.basename(p) for p in summary["written"]] == ["a.png"] and summary["skipped"] == {}


def test_a_rerun_removes_the_half_written_sheets_of_a_killed_run(tmp_path):
    """A plot killed mid-sheet (its whole process group, as a scheduler does) left `.NAME.png.tmp-*` in its folder,
    and the rerun that drew every sheet again kept it there for good."""
    from diffusets_jax.io.wfdb_out import write_record

    write_record(tmp_path / "wfdb" / "rec", synthetic_ecg())
    out = tmp_path / "png"
    plot.plot_wfdb_records([tmp_path / "wfdb" / "rec"], out, dpi=40)
    (out / ".rec.png.tmp-123-0123456789ab").write_bytes(b"half a PNG")
    plot.plot_wfdb_records([tmp_path / "wfdb" / "rec"], out, dpi=40)  # the same command again
    assert sorted(os.listdir(out)) == [".diffusets-run-p0.lock", ".diffusets-run.json", "rec.png"]


def test_metric_intervals_draw_one_bar_and_whisker_per_arm_and_metric(tmp_path):
    from matplotlib.patches import Rectangle

    from diffusets_jax.io.plot import plot_metric_intervals

    panels = [("pvc", {"real": {"auroc": (0.7, 0.6, 0.8), "auprc": (0.4, 0.3, 0.5)},
                       "augmented": {"auroc": (0.8, 0.7, 0.9), "auprc": (float("nan"),) * 3}}),
              ("normal", {"real": {"auroc": (0.9, 0.85, 0.95)}})]
    fig = plot_metric_intervals(panels, [("auroc", "AUROC"), ("auprc", "AUPRC")], path=tmp_path / "bars.png")
    top, bottom = fig.axes
    heights = [p.get_height() for p in top.patches if isinstance(p, Rectangle)]
    assert len(heights) == 4 and sum(np.isnan(heights)) == 1  # the NaN bar is drawn empty
    assert sorted(round(h, 3) for h in heights if np.isfinite(h)) == [0.4, 0.7, 0.8]
    assert [t.get_text() for t in top.get_xticklabels()] == ["AUROC", "AUPRC"]
    whiskers = [c for c in top.containers if hasattr(c, "has_yerr") and c.has_yerr]
    segments = [np.asarray(seg) for c in whiskers for lc in c.lines[2] for seg in lc.get_segments()]
    assert any(np.allclose(seg[:, 1], [0.6, 0.8]) for seg in segments)  # real AUROC: 0.6 .. 0.8
    assert bottom.get_title(loc="left") == "normal"
    with Image.open(tmp_path / "bars.png") as image:
        assert image.format == "PNG"
    with pytest.raises(ValueError, match="no panels"):
        plot_metric_intervals([], [("auroc", "AUROC")])


def test_long_prompts_wrap_over_the_lines_asked_for():
    statements = [f"Statement number {i} of a long machine-read report" for i in range(9)]
    conditions = {"prompt": "\n".join(statements), "sex": 1, "age": 63, "heart_rate": 75}
    full = " | ".join(statements)
    assert len(full) > 2 * plot.PROMPT_LINE_CHARS
    lines = plot.prompt_lines_needed(conditions)
    assert lines == 3 and plot.prompt_lines_needed({"prompt": "Sinus rhythm"}) == plot.prompt_lines_needed(None) == 1

    def prompt_text(fig):
        return next(t.get_text() for t in fig.texts if t.get_fontsize() == 7 and "Statement" in t.get_text())

    one_line = plot_ecg(synthetic_ecg(), conditions=conditions)
    assert prompt_text(one_line) == full[: plot.PROMPT_LINE_CHARS - 3] + "..."
    wrapped = plot_ecg(synthetic_ecg(), conditions=conditions, prompt_lines=lines)
    assert prompt_text(wrapped).replace("\n", " ") == full  # the whole report, over three lines
    assert prompt_text(wrapped).count("\n") == 2
    # The figure grows by the extra lines and the sheet keeps its mm scale.
    extra_mm = (wrapped.get_figheight() - one_line.get_figheight()) * 25.4
    assert extra_mm == pytest.approx(2 * plot.PROMPT_LINE_MM)
    box = wrapped.axes[0].get_position()
    assert box.height * wrapped.get_figheight() * 25.4 == pytest.approx(plot.SHEET_HEIGHT_MM)
    # Fewer lines than needed: cut with "...".
    two = prompt_text(plot_ecg(synthetic_ecg(), conditions=conditions, prompt_lines=2))
    assert two.count("\n") == 1 and two.endswith("...") and len(two) <= 2 * plot.PROMPT_LINE_CHARS + 1
    with pytest.raises(ValueError, match="prompt_lines must be a positive integer"):
        plot_ecg(synthetic_ecg(), prompt_lines=0)


def test_png_metadata_can_be_set_or_removed(tmp_path):
    fig = plot_ecg(synthetic_ecg())
    save_png(fig, tmp_path / "default.png", dpi=30)
    save_png(fig, tmp_path / "none.png", dpi=30, metadata={"Software": None})
    save_png(fig, tmp_path / "set.png", dpi=30, metadata={"Software": None, "Title": "sheet"})
    with Image.open(tmp_path / "default.png") as image:
        assert image.text["Software"].startswith("Matplotlib")
    with Image.open(tmp_path / "none.png") as image:
        assert image.text == {}
    with Image.open(tmp_path / "set.png") as image:
        assert image.text == {"Title": "sheet"}


def test_pngs_are_compressed_at_a_fast_zlib_level_with_the_same_pixels(tmp_path):
    """zlib at Pillow's default level took three quarters of the time a 12-lead sheet took to draw and write, which
    bounded `sample` at about 3.5 ECG/s with PNGs; the fast level writes the same pixels."""
    import io
    import struct
    import zlib

    fig = plot_ecg(synthetic_ecg())
    save_png(fig, tmp_path / "sheet.png", dpi=60)
    data = (tmp_path / "sheet.png").read_bytes()
    position, idat = 8, b""
    while position < len(data):  # the PNG's chunks: the image is the zlib stream of its IDAT chunks
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        idat += data[position + 8:position + 8 + length] if kind == b"IDAT" else b""
        position += 12 + length
    assert idat[1] >> 6 == 1  # the zlib header's level field: 1 = "fast" (levels 2-5); Pillow's default writes 2
    zlib.decompress(idat)
    default = io.BytesIO()
    fig.savefig(default, format="png", dpi=60, facecolor=fig.get_facecolor())
    with Image.open(tmp_path / "sheet.png") as fast, Image.open(default) as slow:
        np.testing.assert_array_equal(np.asarray(fast), np.asarray(slow))


def test_samples_a_record_lacks_are_gaps_not_flat_traces():
    """A 102.4 Hz sheet is interpolated for drawing, and NaN samples (a lead a reference recording lacks, a dropout)
    were drawn as 0 mV: a flat trace, which reads as a recorded flat lead. They are gaps now; the rest is drawn as
    before."""
    from diffusets_jax.ecg.leads import STANDARD_LEADS

    ecg = synthetic_ecg()
    ecg[:, STANDARD_LEADS.index("V2")] = np.nan  # absent (V2 is drawn over 5-7.5 s)
    ecg[100:200, 0] = np.nan  # a dropout in lead I, 0.98-1.95 s
    traces = [line for line in plot_ecg(ecg, 102.4).axes[0].get_lines() if len(line.get_xdata()) > 50]
    y = {label: np.asarray(line.get_ydata(), np.float64) for label, line in zip(
        ["I", "aVR", "V1", "V4", "II", "aVL", "V2", "V5", "III", "aVF", "V3", "V6", "rhythm II"], traces, strict=True)}
    assert np.isnan(y["V2"]).all()
    time_s = (np.asarray(traces[0].get_xdata()) - plot.CALIBRATION_MM) / plot.MM_PER_SECOND
    gap = np.isnan(y["I"])
    assert gap[(time_s > 1.0) & (time_s < 1.93)].all() and not gap[(time_s < 0.95) | (time_s > 2.0)].any()
    clean = [line for line in plot_ecg(synthetic_ecg(), 102.4).axes[0].get_lines() if len(line.get_xdata()) > 50]
    np.testing.assert_array_equal(y["V1"], clean[2].get_ydata())  # a complete lead is drawn as it was


def test_a_reference_is_drawn_with_the_leads_it_lacks_left_blank():
    from diffusets_jax.io.reference import reference_from_array

    t = np.arange(2500) / 250.0
    reference = reference_from_array(np.stack([0.3 * np.sin(2 * np.pi * 1.2 * t + i) for i in range(2)], axis=1),
                                     250.0, ["II", "I"], source="watch")
    shown = reference.recorded()
    assert np.isnan(shown[:, 2:]).all() and np.array_equal(shown[:, :2], reference.ecg[:, :2])
    assert not np.isnan(reference.ecg).any()  # what the sampler and the NPZ get is unchanged


def test_the_plot_command_draws_missing_samples_as_gaps(tmp_path, monkeypatch):
    """`plot` replaced a record's missing samples (NaN) by 0 mV before drawing, so a dropout looked like a recorded
    flat segment; the sheet now gets them as NaN, drawn as gaps."""
    import wfdb

    signal = synthetic_ecg(5000)
    signal[600:900, 0] = np.nan  # lead I loses 1.2-1.8 s
    wfdb.wrsamp("gap", fs=500, units=["mV"] * 12, sig_name=list(plot.STANDARD_LEADS), p_signal=signal,
                fmt=["16"] * 12, write_dir=str(tmp_path))
    drawn = []
    monkeypatch.setattr(plot, "plot_ecg", lambda ecg, *args, **kwargs: drawn.append(ecg) or plot_ecg(ecg, *args, **kwargs))
    plot._draw_record(str(tmp_path / "gap"), "gap", tmp_path / "gap.png", 50)
    (ecg,) = drawn
    assert np.isnan(ecg[600:900, 0]).all() and np.isfinite(ecg[:600]).all() and np.isfinite(ecg[900:]).all()
    traces = [line for line in plot_ecg(ecg, 500.0).axes[0].get_lines() if len(line.get_xdata()) > 50]
    assert np.isnan(np.asarray(traces[0].get_ydata(), np.float64)).sum() == 300  # lead I, first column


def test_a_lead_off_zero_is_drawn_in_its_own_row():
    """A record stored with a lead 4 mV off zero (an electrode's offset, an exporter keeping it) was drawn 40 mm above
    its row's baseline, over the row above; every lead is now drawn around its own baseline, as a cart prints it,
    with its amplitudes unchanged."""
    ecg = synthetic_ecg()
    shifted = ecg.copy()
    shifted[:, 1] += 4.0  # lead II, drawn in row 2 and as the rhythm strip
    shifted[:, 0] -= 3.0  # lead I, row 1
    traces = [line for line in plot_ecg(shifted, 102.4).axes[0].get_lines() if len(line.get_xdata()) > 50]
    clean = [line for line in plot_ecg(ecg, 102.4).axes[0].get_lines() if len(line.get_xdata()) > 50]
    for index in (0, 4, 12):  # I, II in its row, the rhythm strip
        y, y_clean = np.asarray(traces[index].get_ydata()), np.asarray(clean[index].get_ydata())
        np.testing.assert_allclose(y - y_clean, (y - y_clean)[0], atol=1e-9)  # the same trace, shifted at most
        assert abs((y - y_clean)[0]) < 1.0  # within 0.1 mV of where a lead without the offset is drawn
        row = [0, 1, 3][[0, 4, 12].index(index)]
        row_middle = plot.SHEET_HEIGHT_MM - plot.ROW_MM * (row + 0.5)
        assert abs(np.median(y) - row_middle) < plot.ROW_MM / 2  # its baseline inside its own row
