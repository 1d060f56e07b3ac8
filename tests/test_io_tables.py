"""io.tables: the one CSV table reader (prepare's source tables, embed's reports files): BOMs, rows that are not
UTF-8 or malformed skipped with the physical line they start on, unclosed quotes refused with the line they opened
on, fields of any length."""

from __future__ import annotations

import gzip

import pytest

from diffusets_jax.io.tables import LINE_COLUMN, read_csv_table


def read(path, **options):
    skipped = []
    table = read_csv_table(str(path), what="test table", skip=lambda line, why: skipped.append((line, why)), **options)
    return table, skipped


def test_a_utf8_bom_and_crlf_line_ends_are_not_part_of_the_data(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM, which was read into the first column's name ("\\ufeffreport")."""
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfreport,id\r\nSinus rhythm,1\r\n")
    table, skipped = read(path)
    assert list(table.columns) == ["report", "id", LINE_COLUMN] and not skipped
    assert table["report"].tolist() == ["Sinus rhythm"] and table[LINE_COLUMN].tolist() == [2]


def test_rows_are_named_by_the_physical_line_their_record_starts_on(tmp_path):
    """Blank lines and quoted fields that span lines used to shift the numbering (or turn it into "row N")."""
    path = tmp_path / "t.csv"
    path.write_bytes(b'id,report\n\n1,a\n\n2,"two\nlines"\n3,b,extra\n4,"x ""quoted"" \n\nand a blank line"\n'
                     b'5,caf\xe9\n6,"not\nutf-8 \xe9"\n7,5" tall\n')
    table, skipped = read(path, na_filter=False)
    assert table["id"].tolist() == ["1", "2", "4", "7"]
    assert table[LINE_COLUMN].tolist() == [3, 5, 8, 14]
    assert table["report"].tolist() == ["a", "two\nlines", 'x "quoted" \n\nand a blank line', '5" tall']
    assert sorted(skipped) == [(7, "malformed CSV line (expected 2 fields, saw 3)"), (11, "not UTF-8 text"),
                               (12, "not UTF-8 text")]


@pytest.mark.parametrize("rows", [4, 8000])
def test_an_unclosed_quote_is_refused_naming_the_line_it_opened_on(tmp_path, rows):
    """csv.DictReader read every later row into the open field: one record and no error for a short file, a
    `_csv.Error: field larger than field limit` traceback for a long one."""
    path = tmp_path / "unclosed.csv"
    path.write_text('id,report\n1,Sinus rhythm\n2,"Atrial fibrillation\n'
                    + "".join(f"{i},Normal ECG\n" for i in range(3, rows + 3)))
    with pytest.raises(ValueError, match=r"unclosed\.csv line 3: a quoted field opened on this line is never "
                                         r"closed") as raised:
        read(path)
    assert "\n" not in str(raised.value)


def test_fields_of_any_length_are_read(tmp_path):
    """Python's csv module stops at 131,072 characters per field with a traceback."""
    path = tmp_path / "big.csv.gz"
    path.write_bytes(gzip.compress(("report\n" + "x" * 200_000 + "\nshort\n").encode()))
    table, skipped = read(path)
    assert [len(v) for v in table["report"]] == [200_000, 5] and table[LINE_COLUMN].tolist() == [2, 3]


@pytest.mark.parametrize("content,expected", [(b"", "no header line"), (b"\xe9t\xe9,x\n1,2\n", "no header line")])
def test_a_table_without_a_usable_header_is_refused(tmp_path, content, expected):
    path = tmp_path / "t.csv"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=expected):
        read(path)


def test_a_first_row_with_one_field_too_many_is_malformed_not_shifted(tmp_path):
    """pandas took such a row's first field for an index column and read every row one column to the left:
    report "S" became id " x"."""
    path = tmp_path / "t.csv"
    path.write_text("id,report\nS, x,extra\n2,b\n")
    table, skipped = read(path, na_filter=False)
    assert table[["id", "report"]].values.tolist() == [["2", "b"]] and table[LINE_COLUMN].tolist() == [3]
    assert skipped == [(2, "malformed CSV line (expected 2 fields, saw 3)")]


def test_tab_separated_tables_and_repeated_column_names(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text('id\treport\n1\t"two\nlines, with a comma"\n')
    table, _ = read(path, na_filter=False, delimiter="\t")
    assert table["report"].tolist() == ["two\nlines, with a comma"] and table[LINE_COLUMN].tolist() == [2]
    path.write_text("id\treport\treport\n1\ta\tb\n")
    with pytest.raises(ValueError, match=r"t.tsv line 1: the header names column 'report' twice; keep one"):
        read(path, delimiter="\t")


def test_a_repeated_column_name_is_refused_by_default_but_blank_names_are_not(tmp_path):
    """Only the conditions file asked for the check: prepare's and embed's tables read a second "report_1" as
    "report_1.1", so a lookup by name took the first. The empty columns a spreadsheet adds at the end are kept."""
    path = tmp_path / "t.csv"
    path.write_text("study_id,report_0,report_1,report_1\n1,a,b,c\n")
    with pytest.raises(ValueError, match=r"t.csv line 1: the header names column 'report_1' twice; keep one"):
        read(path)
    path.write_text("id,report,,\n1,a,,\n")
    table, skipped = read(path, na_filter=False)
    assert table["report"].tolist() == ["a"] and skipped == []
