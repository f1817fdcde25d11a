"""Models and devices: loading checkpoints and tokenizers, the named pairs, the hooks that record the residual
stream, and device-to-host copies made behind the computation."""
