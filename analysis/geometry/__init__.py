"""Geometry of the residual stream: per-position metrics, massive activations, shared prefixes, and
the dimension-collapse decompositions."""
