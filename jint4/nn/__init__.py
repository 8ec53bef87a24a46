"""Flax layers: Int4Dense (linen), Int4Linear (nnx) and int4ify."""
