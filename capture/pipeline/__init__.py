"""Execution: the capture job, forwards over batches, device-to-host copies, clusters and sweeps."""
