"""Activation loading for dictionary learning: the selection and its reads, the torch dataset, the dry-run stats."""
