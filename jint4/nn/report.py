"""What `int4ify` did to each linear-like layer of a model, as a table.

Every layer that holds a ``kernel`` or an ``embedding``, and each of
attention's two products (Q K^T, P V), gets a row: its path, type, shape,
whether it computes in INT4 and, when it does not, why (kept by ``keep``, no
usable Hadamard block for its contraction dim, a custom ``dot_general``, a
layer type jint4 does not convert, an option that is off); for converted
layers the Hadamard block it uses (1: no Hadamard transform). A layer is
never left in float without a row saying so.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerReport:
  """One row: ``converted`` layers run INT4 with ``block``; others say ``why``."""
  path: str
  layer: str                    # the layer's type name, e.g. "Dense"
  shape: Tuple[int, ...]        # the kernel's shape (products: contraction, free)
  converted: bool
  block: Optional[int] = None   # the Hadamard block (None: not converted or "auto")
  why: str = ""


def format_table(rows: Sequence[LayerReport]) -> str:
  """A plain-text table of ``rows``, one line per layer, plus a count."""
  head = ("path", "layer", "kernel", "INT4", "block", "why")
  body = [(r.path or "(top)", r.layer, "x".join(map(str, r.shape)),
           "yes" if r.converted else "no",
           "" if r.block is None else str(r.block), r.why) for r in rows]
  widths = [max(len(str(c)) for c in col) for col in zip(head, *body)] if body else [
      len(h) for h in head]
  line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
  converted = sum(r.converted for r in rows)
  return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
                   + [f"{converted} of {len(rows)} linear-like layers in INT4"])
