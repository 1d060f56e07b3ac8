"""The three TFDS builders on the real fixtures: documented defects, read-back, splits, resume, CLI.

Each fixture layout is built once per module (real WFDB decoding, real XQRS, real local MiniLM embeddings,
real TFRecords) and read back through TFDS.
"""

import csv
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusets_jax.cli import main
from diffusets_jax.data import sources
from diffusets_jax.data.builder import REPORT_FILENAME, subject_split
from diffusets_jax.ecg.leads import STANDARD_LEADS

pytestmark = pytest.mark.slow

ECG_DATA = os.path.join(os.path.dirname(__file__), "data", "ecg")
DEMO_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "diffusets_jax", "demo_data", "cinc2021")
TRUTH = json.load(open(os.path.join(ECG_DATA, "truth.json")))
REFERENCE = json.load(open(os.path.join(ECG_DATA, "reference_rr.json")))["records"]  # independent beats/rates
STUDY_TO_NAME = {v["study_id"]: k for k, v in TRUTH.items()}
LEAD = {name: i for i, name in enumerate(STANDARD_LEADS)}


def read_split(builder, split: str) -> list[dict]:
    return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def decoded_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@pytest.fixture(scope="module")
def embedder():
    """One real MiniLM encoder for every build here, so its jitted encoder compiles once."""
    from diffusets_jax.conditioning.embedders import make_embedder

    return make_embedder("local")


@pytest.fixture(scope="module")
def built(tmp_path_factory, embedder):
    """source -> (builder, report, {split: examples}); built lazily, once."""
    cache: dict[str, tuple] = {}
    root = tmp_path_factory.mktemp("prepared")

    def build(source: str, manual_dir: str | None = None, workers: int = 0):
        if manual_dir is None:  # only asks where the shared embedding cache is
            return str(root / "embeddings.sqlite")
        if source not in cache:
            report = sources.prepare(
                source, manual_dir, str(root / source), workers=workers, embedder=embedder,
                embedding_cache_path=str(root / "embeddings.sqlite"),
            )
            builder = sources.make_builder(source, str(root / source))
            examples = {split: read_split(builder, split) for split in ("train", "validation", "test")}
            cache[source] = (builder, report, examples)
        return cache[source]

    return build


def check_ecg_examples(examples: list[dict]) -> None:
    for example in examples:
        ecg = example["ecg"]
        assert ecg.shape == (1024, 12) and ecg.dtype == np.float32 and np.isfinite(ecg).all()
        scale = np.abs(ecg[:, :6]).max()
        # Einthoven and Goldberger: wrong lead order or a swapped aVL/aVF breaks these per sample.
        assert np.abs(ecg[:, LEAD["II"]] - ecg[:, LEAD["I"]] - ecg[:, LEAD["III"]]).max() < 0.03 * scale + 0.01
        assert np.abs(ecg[:, LEAD["aVR"]] + ecg[:, LEAD["aVL"]] + ecg[:, LEAD["aVF"]]).max() < 0.03 * scale + 0.01
        assert example["text_embedding"].shape == (384,)
        assert np.linalg.norm(example["text_embedding"]) == pytest.approx(1.0, abs=1e-3)


def test_mimic_iv_ecg_build_counts_the_documented_defects(built):
    from diffusets_jax.conditioning.prompts import ordered_prompt

    builder, report, examples = built("mimic-iv-ecg", os.path.join(ECG_DATA, "mimic_iv_ecg"), workers=2)
    assert report["records_listed"] == 40 and report["examples_written"] == 39
    assert report["skipped_by_reason"] == {"missing_demographics": 1}
    assert report["skipped_examples"]["missing_demographics"][0]["record_path"].endswith("/40000014")  # E07514
    assert report["heart_rate_sources"] == {"qrs": 2, "rr": 37}
    detected = {STUDY_TO_NAME[int(r["record_path"].rsplit("/", 1)[1])]: r["lead"]
                for r in report["detected_heart_rate_records"]}
    assert detected == {"E07503": -1, "JS20004": -1}  # the multi-lead consensus, no single lead
    assert json.load(open(os.path.join(builder.data_dir, REPORT_FILENAME))) == report

    rr_interval = {int(r["study_id"]): float(r["rr_interval"]) for r in csv.DictReader(open(os.path.join(ECG_DATA, "mimic_iv_ecg", "machine_measurements.csv")))}
    split_of_subject: dict[int, str] = {}
    for split, split_examples in examples.items():
        assert len(split_examples) == report["examples_per_split"][split]
        check_ecg_examples(split_examples)
        for example in split_examples:
            name = STUDY_TO_NAME[int(example["study_id"])]
            truth = TRUTH[name]
            assert int(example["subject_id"]) == truth["subject_id"]
            assert split_of_subject.setdefault(truth["subject_id"], split) == split  # patient-disjoint
            assert split == subject_split(truth["subject_id"])
            lines = [decoded_text(line) for line in example["report_lines"]]
            assert lines == truth["reports"]
            assert decoded_text(example["prompt"]) == ordered_prompt(lines)
            assert example["age"] == truth["age"] and example["sex"] == int(truth["sex"] == "Male")
            source = decoded_text(example["heart_rate_source"])
            if name in ("E07503", "JS20004"):
                assert source == "qrs"  # both sinus tachycardias; rates against tests/data/ecg/reference_rr.json
                assert example["heart_rate"] == pytest.approx(REFERENCE[name]["heart_rate_bpm"], abs=1.5)
            else:
                assert source == "rr"
                assert example["heart_rate"] == pytest.approx(60000.0 / rr_interval[truth["study_id"]], rel=1e-6)
                assert example["heart_rate"] == pytest.approx(60000.0 / truth["rr_ms"], rel=2e-3)
    assert split_of_subject[19000010] in ("train", "validation", "test")  # E07509 and E07510 together
    assert "E07514" not in {STUDY_TO_NAME[int(e["study_id"])] for s in examples.values() for e in s}
    everything = read_split(builder, "all")  # the all-data recipe: TFDS's union of the three splits
    assert sorted(decoded_text(e["record_path"]) for e in everything) == sorted(
        decoded_text(e["record_path"]) for s in examples.values() for e in s
    )


def test_ptbxl_build_uses_strat_folds_sex_convention_and_the_paper_template(built):
    _, report, examples = built("ptbxl", os.path.join(ECG_DATA, "ptbxl"))
    assert report["examples_written"] == 40 and report["records_skipped"] == 0
    assert report["heart_rate_sources"] == {"qrs": 40}
    assert sorted(int(e["study_id"]) for e in examples["test"]) == [10, 20, 30, 40]  # strat_fold == 10
    assert sorted(int(e["study_id"]) for e in examples["validation"]) == [9, 19, 29, 39]
    names = list(TRUTH)
    for split_examples in examples.values():
        check_ecg_examples(split_examples)
        for example in split_examples:
            truth = TRUTH[names[int(example["study_id"]) - 1]]
            assert example["sex"] == int(truth["sex"] == "Male")  # PTB-XL's 0 = male became 1 = male
            prompt = decoded_text(example["prompt"])
            assert prompt.startswith("The report of the ECG is that ") and prompt.endswith(".")
            name = names[int(example["study_id"]) - 1]
            assert decoded_text(example["heart_rate_source"]) == "qrs"
            assert example["heart_rate"] == pytest.approx(REFERENCE[name]["heart_rate_bpm"], abs=1.5)


def test_physionet_challenge_build_maps_dx_codes_to_report_lines(built):
    _, report, examples = built("physionet-challenge", DEMO_DIR)
    assert report["examples_written"] == 40 and report["records_skipped"] == 0
    assert report["heart_rate_sources"] == {"qrs": 40}
    assert report["written_with_flat_leads"]["count"] == 2  # JS20004 and JS20008: zero V2, V4, V6
    assert len(report["detected_heart_rate_records"]) == 40
    # Codes the fixture's report generator left out (truth.json omits them); we name them.
    named_here = {"253352002": "Left atrial abnormality", "426434006": "Anterior ischemia",
                  "251187003": "Atrial escape beat", "55827005": "Left ventricular high voltage", "713422000": "Atrial tachycardia"}
    compared = 0
    for split_examples in examples.values():
        check_ecg_examples(split_examples)
        for example in split_examples:
            name = decoded_text(example["record_path"])
            header = open(os.path.join(DEMO_DIR, name + ".hea")).read()
            lines = [decoded_text(line) for line in example["report_lines"]]
            extra = [statement for code, statement in named_here.items() if code in header]
            assert [line for line in lines if line not in extra] == TRUTH[name]["reports"]
            compared += not extra
            assert example["age"] == TRUTH[name]["age"] and example["sex"] == int(TRUTH[name]["sex"] == "Male")
            if name == "JS20004":
                assert 95 < example["heart_rate"] < 160
    assert compared >= 25


def test_a_build_writes_each_example_in_canonical_bytes(built):
    """Two `prepare`s of the same records wrote TFRecords that held the same examples but differed byte for byte:
    TFDS serializes an Example's feature map in an order that changes from process to process. Each record is now
    its deterministic serialization (keys sorted), the same in every process, as encode and corpora write."""
    import tensorflow as tf

    builder, _, _ = built("physionet-challenge", DEMO_DIR)
    files = sorted(p for p in os.listdir(builder.data_dir) if ".tfrecord-" in p)
    records = [bytes(r) for f in files for r in tf.data.TFRecordDataset(os.path.join(builder.data_dir, f))
               .as_numpy_iterator()]
    assert len(records) == 40
    for record in records:
        assert record == tf.train.Example.FromString(record).SerializeToString(deterministic=True)


def test_rebuild_after_interruption_reuses_decoded_chunks(built, embedder, tmp_path):
    builder, first_report, first_examples = built("mimic-iv-ecg", os.path.join(ECG_DATA, "mimic_iv_ecg"), workers=2)
    data_dir = os.path.dirname(os.path.dirname(os.path.dirname(builder.data_dir)))
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    shutil.rmtree(copy / "mimic_iv_ecg")  # the TFRecords are gone, as after a crash before TFDS's final rename
    cache_dir = copy / "downloads" / "decode_cache" / "mimic_iv_ecg-1.0.0"
    chunk_files = sorted(os.listdir(cache_dir))
    os.remove(cache_dir / chunk_files[0])  # this chunk was still being decoded
    report = sources.prepare(
        "mimic-iv-ecg", os.path.join(ECG_DATA, "mimic_iv_ecg"), str(copy), workers=0, embedder=embedder,
        embedding_cache_path=built("mimic-iv-ecg"),
    )
    assert report["decode_chunks"] == {"total": len(chunk_files), "reused": len(chunk_files) - 1, "decoded": 1}
    assert report["embedding"]["embedded_now"] == 0  # every prompt came from the embedding cache
    assert {k: report[k] for k in ("examples_written", "skipped_by_reason", "heart_rate_sources")} == {
        k: first_report[k] for k in ("examples_written", "skipped_by_reason", "heart_rate_sources")
    }
    rebuilt = sources.make_builder("mimic-iv-ecg", str(copy))
    first = {decoded_text(e["record_path"]): e["ecg"] for e in first_examples["train"]}
    for example in read_split(rebuilt, "train"):
        np.testing.assert_array_equal(example["ecg"], first[decoded_text(example["record_path"])])


def test_cli_prepare_skips_and_counts_bad_records(built, tmp_path, capsys):
    """A PTB-XL download with broken records still builds; each problem is counted under its reason."""
    built("ptbxl", os.path.join(ECG_DATA, "ptbxl"))  # fills the embedding cache with these prompts
    manual = tmp_path / "ptbxl"
    rows = list(csv.DictReader(open(os.path.join(ECG_DATA, "ptbxl", "ptbxl_database.csv"))))[:10]
    for row in rows:
        os.makedirs(manual / os.path.dirname(row["filename_hr"]), exist_ok=True)
        for ext in (".hea", ".dat"):
            shutil.copy(os.path.join(ECG_DATA, "ptbxl", row["filename_hr"] + ext), manual / (row["filename_hr"] + ext))
    rows[0]["age"] = "300"  # PTB-XL's missing-age sentinel
    rows[1]["sex"] = ""
    rows[2]["report"] = ""
    os.remove(manual / (rows[3]["filename_hr"] + ".dat"))
    dat = manual / (rows[4]["filename_hr"] + ".dat")
    dat.write_bytes(dat.read_bytes()[:1000])
    (manual / (rows[5]["filename_hr"] + ".hea")).write_text("garbage\n")
    rows[6]["filename_hr"] = ""  # was a traceback (itertuples renames the `_line` column)
    rows[7]["strat_fold"] = "x"  # was the whole build stopping: "record has no strat_fold"
    with open(manual / "ptbxl_database.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    code = main([
        "prepare", "ptbxl", "--manual-dir", str(manual), "--data-dir", str(tmp_path / "out"), "--workers", "0",
        "--embedding-cache", built("ptbxl"),
    ])
    assert code == 0
    report = json.load(open(tmp_path / "out" / "ptbxl" / "local" / "1.0.0" / REPORT_FILENAME))
    assert report["skipped_by_reason"] == {
        "missing_age": 1, "missing_sex": 1, "missing_report": 1, "missing_signal_file": 1,
        "truncated_signal_file": 1, "unreadable_header": 1, "bad_table_row": 2,
    }
    assert [(e["record_path"].split("/")[-1], e["detail"]) for e in report["skipped_examples"]["bad_table_row"]] == [
        ("ptbxl_database.csv line 8", "no filename_hr"),
        ("ptbxl_database.csv line 9", "strat_fold 'x' is not a fold number 1-10")]
    assert report["examples_written"] == 2 and report["embedding"]["embedded_now"] == 0
    assert report["skipped_examples"]["missing_signal_file"][0]["record_path"] == rows[3]["filename_hr"]
    summary = capsys.readouterr().err
    assert "skipped       1 truncated_signal_file" in summary
    # Written and skipped add up to the records listed; the table rows that never became records are said apart.
    first = [line for line in summary.splitlines() if line.startswith("ptbxl: ")][-1]
    assert f"{report['examples_written']} examples written from {report['records_listed']} records" in first
    assert f"; {report['records_listed'] - report['examples_written']} skipped, and 2 unusable source-table rows" in first
    assert main(["prepare", "ptbxl", "--manual-dir", str(tmp_path / "nowhere"), "--data-dir", str(tmp_path / "o")]) == 2


def test_mimic_listing_keeps_each_record_once_and_reads_only_m_and_f_as_sex(tmp_path):
    """A record listed twice gave TFDS two examples with one key (its AssertionError after all the decoding), and a
    gender other than M was read as female."""
    manual = tmp_path / "mimic"
    shutil.copytree(os.path.join(ECG_DATA, "mimic_iv_ecg"), manual, ignore=shutil.ignore_patterns("files"))
    listed = (manual / "record_list.csv").read_text().splitlines(keepends=True)
    (manual / "record_list.csv").write_text("".join([*listed, listed[2]]))  # a repeated row
    patients = list(csv.DictReader(open(manual / "patients.csv")))
    patients[1]["gender"] = "X"
    with open(manual / "patients.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(patients[0]))
        writer.writeheader()
        writer.writerows(patients)
    builder = sources.make_builder("mimic-iv-ecg", str(tmp_path / "out"))
    candidates = builder.candidates(str(manual))
    repeated = listed[2].strip().split(",")[-1]
    assert len(candidates) == 40 and [c.record_path for c in candidates].count(repeated) == 1
    assert builder._table_skips == [{"record_path": repeated, "detail": "listed again; the first listing is used"}]
    sex = {c.subject_id: c.sex for c in candidates}
    assert sex[int(patients[1]["subject_id"])] is None  # missing_sex when decoded, not a female patient
    assert sex[int(patients[0]["subject_id"])] == int(patients[0]["gender"] == "M")


def test_sources_map_cli_names_to_builders(tmp_path):
    assert sources.dataset_name("mimic-iv-ecg") == "mimic_iv_ecg"
    assert sources.builder_class("ptbxl").name == "ptbxl"
    assert sources.builder_class("physionet_challenge").name == "physionet_challenge"
    with pytest.raises(ValueError, match="unknown ECG source"):
        sources.dataset_name("mitdb")
    with pytest.raises(ValueError, match="own config name"):
        sources.make_builder("ptbxl", str(tmp_path), split_fractions=(0.7, 0.15, 0.15))
    variant = sources.make_builder("ptbxl", str(tmp_path), name="local_70", split_by="subject_hash", split_fractions=(0.7, 0.15, 0.15))
    assert variant.builder_config.name == "local_70"
    assert variant.info.features["text_embedding"].shape == (384,)
    assert sources.make_builder("mimic-iv-ecg", str(tmp_path), "openai").info.features["text_embedding"].shape == (1536,)


@pytest.mark.parametrize("source", ["mimic-iv-ecg", "ptbxl", "physionet-challenge"])
def test_a_builder_leaves_nothing_in_the_temporary_directory(source, tmp_path, monkeypatch):
    """TFDS's own DatasetInfo makes an empty temporary folder for every builder of a dataset not prepared yet and
    leaves it behind; ours does not, and still takes its description and citation from the source's folder."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temporary))
    builder = sources.make_builder(source, str(tmp_path / "data"))
    assert list(temporary.iterdir()) == []
    folder = os.path.join(os.path.dirname(sources.__file__), os.pardir, os.pardir, "data_prep",
                          sources.dataset_name(source))
    assert builder.info.description.strip() == open(os.path.join(folder, "README.md")).read().strip()
    assert builder.info.citation.strip() == open(os.path.join(folder, "CITATIONS.bib")).read().strip()


def test_mimic_tables_listing_a_study_or_subject_twice_count_the_later_rows(tmp_path):
    """A second machine_measurements row of a study (another report) or patients row of a subject (another age) was
    dropped without a word, and a second record listed under one study was given that study's report: the first is
    used, and each later one is counted as a bad table row."""
    manual = tmp_path / "mimic"
    shutil.copytree(os.path.join(ECG_DATA, "mimic_iv_ecg"), manual, ignore=shutil.ignore_patterns("files"))
    for name, column, value in (("machine_measurements.csv", "report_0", "Atrial fibrillation"),
                                ("patients.csv", "anchor_age", "33")):
        rows = list(csv.DictReader(open(manual / name)))
        with open(manual / name, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows([*rows, {**rows[3], column: value}])
    listed = (manual / "record_list.csv").read_text().splitlines(keepends=True)
    first, other = listed[4].split(","), listed[5].split(",")
    listed[5] = ",".join([other[0], first[1], *other[2:]])  # another record under the study of the one before
    (manual / "record_list.csv").write_text("".join(listed))
    builder = sources.make_builder("mimic-iv-ecg", str(tmp_path / "out"))
    listing = builder.candidates(str(manual))
    candidates = {c.study_id: c for c in listing}
    study = int(list(csv.DictReader(open(manual / "machine_measurements.csv")))[3]["study_id"])
    # That record would have been written with the other one's report and RR interval: it is counted instead.
    assert [c.record_path for c in listing if c.study_id == int(first[1])] == [first[4].strip()]
    subject = int(list(csv.DictReader(open(manual / "patients.csv")))[3]["subject_id"])
    assert candidates[study].report_lines[0] != "Atrial fibrillation"
    assert all(c.age != 33 for c in candidates.values() if c.subject_id == subject)
    assert sorted((row["record_path"].split("/")[-1], row["detail"]) for row in builder._table_skips) == [
        ("machine_measurements.csv line 42", f"study_id {study} listed again; the first row is used"),
        ("patients.csv line 40", f"subject_id {subject} listed again; the first row is used"),
        ("record_list.csv line 6", f"study_id {first[1]} is already the study of record {first[4].strip()}; the first "
                                   "is used")]


def test_mimic_report_cells_holding_line_breaks_are_read_as_embed_and_sample_read_them(tmp_path):
    """A report_N cell holding a line break was one statement in prepare ("{Sinus rhythm\\nLeft axis deviation}")
    and two in sample: the U-Net was trained on a prompt that sampling never builds. Cells without one are read as
    before, so their prompts, and the embedding caches holding them, are unchanged."""
    from diffusets_jax.conditioning.prompts import make_prompt
    from diffusets_jax.conditioning.requests import make_condition

    manual = tmp_path / "mimic"
    shutil.copytree(os.path.join(ECG_DATA, "mimic_iv_ecg"), manual, ignore=shutil.ignore_patterns("files"))
    rows = list(csv.DictReader(open(manual / "machine_measurements.csv")))
    before = {int(r["study_id"]): tuple(r[f"report_{i}"].strip() for i in range(18) if r[f"report_{i}"].strip())
              for r in rows}
    rows[0]["report_0"] = "Sinus rhythm\r\nLeft axis deviation"
    with open(manual / "machine_measurements.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    candidates = {c.study_id: c for c in sources.make_builder("mimic-iv-ecg", str(tmp_path / "out")).candidates(str(manual))}
    changed = int(rows[0]["study_id"])
    assert candidates[changed].report_lines == ("Sinus rhythm", "Left axis deviation", *before[changed][1:])
    sampled = make_condition("|".join(("Sinus rhythm\nLeft axis deviation", *before[changed][1:])), "M", 50, 70)
    assert make_prompt(candidates[changed].report_lines, "ordered") == sampled.prompt("ordered")
    assert all(c.report_lines == before[study] for study, c in candidates.items() if study != changed)


def test_mimic_listing_looks_up_the_tables_once_not_once_per_record(tmp_path, monkeypatch):
    """Five pandas `.loc` lookups per record cost 0.2-0.3 ms: three to four minutes of every prepare of MIMIC-IV-ECG's
    800,000 records, even one that finds its dataset complete. The lookups must not grow with the record count."""
    import pandas as pd

    lookups = []
    original = pd.core.indexing._LocIndexer.__getitem__
    monkeypatch.setattr(pd.core.indexing._LocIndexer, "__getitem__",
                        lambda self, key: lookups.append(key) or original(self, key))

    def lookups_listing(copies: int) -> int:
        manual = tmp_path / f"mimic-{copies}"
        shutil.copytree(os.path.join(ECG_DATA, "mimic_iv_ecg"), manual, ignore=shutil.ignore_patterns("files"))
        for table, id_column in (("record_list.csv", "study_id"), ("machine_measurements.csv", "study_id")):
            rows = list(csv.DictReader(open(manual / table)))
            more = [{**row, id_column: str(int(row[id_column]) + 1000 * k),
                     **({"path": f"{row['path']}-{k}"} if "path" in row else {})}
                    for k in range(copies) for row in rows]
            with open(manual / table, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(more)
        lookups.clear()
        candidates = sources.make_builder("mimic-iv-ecg", str(tmp_path / "out")).candidates(str(manual))
        assert len(candidates) == 40 * copies and sum(bool(c.report_lines) for c in candidates) == 40 * copies
        return len(lookups)

    assert lookups_listing(1) == lookups_listing(3)
