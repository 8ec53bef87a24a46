"""Pure quantizer math: no Flax, no engines. One quantizer per module."""
