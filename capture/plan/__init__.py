"""Planning, before any weights load: passes, residency, batches, the store template, memory and time.

Nothing here imports :mod:`capture.pipeline` (tested in ``tests/test_layering.py``)."""
