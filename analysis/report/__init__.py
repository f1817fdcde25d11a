"""The report: text tables, the opening summary, the HTML page and its figures, exported rows."""
