"""Generation outputs: WFDB records (`wfdb_out`) and clinical 12-lead PNG sheets and evaluation plots (`plot`)."""
