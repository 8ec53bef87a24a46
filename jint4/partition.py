"""The INT4 linear op under `jax.sharding`: one partitioning rule for its
forward and one for its backward.

`jint4.matmul` runs the op's forward (quantize x, quantize the kernel, one
integer GEMM) and its backward (bit splitting, the two gradient GEMMs, the LSQ
backward of each operand) as two `jax.experimental.custom_partitioning`
functions. Under ``jax.jit`` with sharded operands XLA's partitioner (Shardy
where the JAX version has it, else GSPMD) calls `_partition` with the
operands' shardings, and every device then runs the op's math on its own
shard, with the few collectives the math needs made explicit here (the
`Comm` the math is given). Without a mesh the same math runs with no
collectives. So no operand is gathered where the float ``nn.Dense`` would not
gather it, and what is gathered moves as 4-bit codes.

The op is batched, x [B, N, D] @ kernel [B, D, C] -> y [B, N, C] (B = 1 for
a dense layer; attention's products have B = batch x heads). Its `Layout`
names the mesh axes that shard each dim:

  x, y, G, the residual   b, n (token rows), d (contraction), c (features)
  the kernel              b, kd, kc: its own sharding, kept as the user set it

x's sharding decides (b, n, d); the output features are sharded like the
kernel's (c = kc minus the axes x already uses). The layouts users train with:

  data parallel      x: n over "data"; kernel replicated.
  tensor parallel    column: kernel kc over "model" -> y's c over "model";
  (Megatron)         row: x's d and kernel's kd over "model" -> y is summed
                     over "model" (one all-reduce, as in float).
  FSDP / ZeRO-3      kernel kd (or kc) over "data", x's n over "data": the
                     kernel is quantized shard-locally (the block Hadamard
                     stays inside a shard, the step size is per tensor) and
                     its INT4 codes, two per byte, are all-gathered: a quarter
                     of the bytes of a bfloat16 gather. The backward gathers
                     the codes again (the forward keeps only its own shard),
                     and dW is reduce-scattered back to the kernel's shards.
  2-D data x model   any combination of the above.

Per-tensor quantities stay per tensor: the step sizes are replicated and
their gradients summed over the shards (`jax.lax.psum`); bit splitting's
max|G| is one scalar all-reduce (max); the row norms that leverage score
sampling reads are summed over the shards of their row. Sampling itself is
stratified: each shard of rows keeps ceil(budget fraction x its rows) of them,
sampled from its own rows with the same systematic sampler, which keeps the
estimate unbiased (a sum of unbiased per-stratum estimates). Stochastic
rounding draws per shard: the key is folded with the shard's index over the
axes that split the rounded tensor, so replicas of a shard agree and distinct
shards draw independently. The forward (deterministic rounding) is thus
bit-identical to one device wherever no partial sums are added across
shards; the backward is equal in distribution.

Constraints, checked with an error that says how to fix them: a shard of the
contraction dim must hold whole Hadamard blocks (and whole bytes of the
residual's flag bits: a multiple of 8 elements), and the Hadamard block
cannot be searched ("auto") when the contraction dim is sharded.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

Axes = Tuple[str, ...]
_NONE: Axes = ()


@dataclasses.dataclass(frozen=True)
class Layout:
  """The mesh axes that shard each dim of the op (see the module doc)."""
  b: Axes = _NONE
  n: Axes = _NONE
  d: Axes = _NONE
  c: Axes = _NONE
  kd: Axes = _NONE
  kc: Axes = _NONE
  sizes: Tuple[Tuple[str, int], ...] = ()

  @property
  def trivial(self) -> bool:
    return not any((self.b, self.n, self.d, self.c, self.kd, self.kc))

  def count(self, axes: Axes) -> int:
    size = dict(self.sizes)
    return int(np.prod([size[a] for a in axes], dtype=np.int64))

  def x_spec(self):
    return P(entry(self.b), entry(self.n), entry(self.d))

  def y_spec(self):
    return P(entry(self.b), entry(self.n), entry(self.c))

  def kernel_spec(self):
    return P(entry(self.b), entry(self.kd), entry(self.kc))


SINGLE = Layout()


class Comm:
  """The collectives of one shard of the op, for its `Layout`; with the
  trivial layout (one device, or no mesh) every method is the identity."""

  def __init__(self, layout: Layout = SINGLE):
    self.layout = layout

  @property
  def trivial(self) -> bool:
    return self.layout.trivial

  def axes(self, *dims: str) -> Axes:
    return tuple(a for dim in dims for a in getattr(self.layout, dim))

  def shard_index(self, axes: Axes) -> jax.Array:
    """This shard's linear index over ``axes`` (major to minor)."""
    index = jnp.zeros((), jnp.int32)
    for a in axes:
      index = index * self.layout.count((a,)) + jax.lax.axis_index(a)
    return index

  def key_for(self, key: jax.Array, *dims: str) -> jax.Array:
    """``key`` folded with this shard's index over the axes of ``dims``:
    the same on replicas of a shard, distinct across shards."""
    axes = self.axes(*dims)
    return jax.random.fold_in(key, self.shard_index(axes)) if axes else key

  def global_size(self, local: int, *dims: str) -> int:
    return local * self.layout.count(self.axes(*dims))

  def psum(self, x: jax.Array, *dims: str) -> jax.Array:
    axes = self.axes(*dims)
    return jax.lax.psum(x, axes) if axes else x

  def pmax(self, x: jax.Array, *dims: str) -> jax.Array:
    axes = self.axes(*dims)
    return jax.lax.pmax(x, axes) if axes else x

  def row_norms(self, norms: jax.Array, *dims: str) -> jax.Array:
    """Euclidean row norms from the shards' partial ones (NaN stays NaN)."""
    axes = self.axes(*dims)
    if not axes:
      return norms
    return jnp.sqrt(jax.lax.psum(jnp.square(norms), axes))

  def regrid(self, x: jax.Array, src: Axes, dst: Axes, axis: int) -> jax.Array:
    """x, sharded along ``axis`` over ``src``, as sharded over ``dst``:
    all-gathered over ``src`` (if it differs), then sliced for ``dst``."""
    if src == dst:
      return x
    if src:
      x = jax.lax.all_gather(x, src, axis=axis, tiled=True)
    if dst:
      size = x.shape[axis] // self.layout.count(dst)
      x = jax.lax.dynamic_slice_in_dim(x, self.shard_index(dst) * size, size,
                                       axis=axis)
    return x

  def regrid_codes(self, q: jax.Array, grids: Sequence[Tuple[int, Axes, Axes]],
                   pack_axis: int) -> jax.Array:
    """int8 codes in [-8, 7] regridded per ``(axis, src, dst)``; what is
    gathered moves packed two codes per byte along ``pack_axis``."""
    if not any(src and src != dst for _, src, dst in grids):
      for axis, src, dst in grids:       # slices only: nothing to move
        q = self.regrid(q, src, dst, axis)
      return q
    packed = pack_int4(q, pack_axis)
    for axis, src, dst in grids:
      packed = self.regrid(packed, src, dst, axis)
    return unpack_int4(packed, pack_axis)

  def reduce_regrid(self, x: jax.Array, partial: Axes,
                    grids: Sequence[Tuple[int, Axes, Axes]]) -> jax.Array:
    """The sum of ``x``'s partial values over ``partial``, regridded per
    ``(axis, src, dst)``: reduce-scattered along a dim whose ``dst`` is made
    of summed axes only (FSDP), all-reduced over the rest."""
    partial = tuple(partial)
    for axis, src, dst in grids:
      if not src and dst and set(dst) <= set(partial):
        x = jax.lax.psum_scatter(x, dst, scatter_dimension=axis, tiled=True)
        partial = tuple(a for a in partial if a not in dst)
        grids = [(a, dst if a == axis else s, t) for a, s, t in grids]
    if partial:
      x = jax.lax.psum(x, partial)
    for axis, src, dst in grids:
      x = self.regrid(x, src, dst, axis)
    return x


def pack_int4(q: jax.Array, axis: int) -> jax.Array:
  """int8 codes in [-8, 7] -> uint8, two per byte along ``axis`` (even)."""
  q = jnp.moveaxis(q, axis, -1).astype(jnp.uint8) & np.uint8(0xF)
  q = q.reshape(*q.shape[:-1], -1, 2)
  return jnp.moveaxis(q[..., 0] | (q[..., 1] << 4), -1, axis)


def unpack_int4(packed: jax.Array, axis: int) -> jax.Array:
  """Inverse of `pack_int4`."""
  p = jnp.moveaxis(packed, axis, -1)
  lo = (p & np.uint8(0xF)).astype(jnp.int8)
  hi = (p >> 4).astype(jnp.int8)
  q = jnp.stack([lo, hi], axis=-1).reshape(*p.shape[:-1], -1)
  q = jnp.where(q > 7, q - 16, q).astype(jnp.int8)
  return jnp.moveaxis(q, -1, axis)


# --- the two partitioned functions -------------------------------------------


@dataclasses.dataclass(frozen=True)
class OpSpec:
  """What a partitioned function needs besides its arrays (static, hashable).

  ``shard_fn(spec, comm, *local_arrays)`` is the op's math on one shard;
  ``layout_fn(spec, mesh, arg_shapes)`` reads a `Layout` from the operands'
  shardings (raising on one the op cannot run); ``shardings_fn(spec, mesh,
  layout, arg_shapes)`` gives (result shardings, operand shardings).
  ``static``: the op's own static arguments, read by those three.
  """
  shard_fn: Callable[..., Any]
  layout_fn: Callable[..., Layout]
  shardings_fn: Callable[..., Tuple[Any, Any]]
  static: Any


def partitioned(rule: str, name: str, in_b: Sequence[Optional[int]],
                out_b: Sequence[Optional[int]], factor_sizes=None):
  """A function ``f(spec, *arrays)`` that runs ``spec.shard_fn`` per shard
  (a `custom_partitioning` with the Shardy ``rule``: einsum-like factors,
  for propagation) and under `jax.vmap` folds the mapped axis into the op's
  own batch dim (``in_b`` / ``out_b``: where each operand / result has it,
  None for none), as one op; with a mapped operand that has no batch dim (a
  step size, say) it maps the op sequentially instead."""

  @functools.partial(custom_partitioning, static_argnums=(0,))
  def op(spec, *arrays):
    # Under jit, constants the math creates (tables, Hadamard matrices) stay
    # inside the inner jaxpr: custom_partitioning takes none of its own.
    return jax.jit(functools.partial(spec.shard_fn, spec, Comm(SINGLE)))(*arrays)

  def partition(spec, mesh, arg_shapes, result_shape):
    layout = spec.layout_fn(spec, mesh, arg_shapes)
    results, operands = spec.shardings_fn(spec, mesh, layout, arg_shapes)
    comm = Comm(layout)

    def lower(*arrays):
      return jax.jit(functools.partial(spec.shard_fn, spec, comm))(*arrays)

    return mesh, lower, results, operands

  def infer(spec, mesh, arg_shapes, result_shape):
    layout = spec.layout_fn(spec, mesh, arg_shapes)
    return spec.shardings_fn(spec, mesh, layout, arg_shapes)[0]

  op.def_partition(partition=partition, infer_sharding_from_operands=infer,
                   propagate_user_sharding=None, sharding_rule=rule,
                   **(factor_sizes or {}))

  def call(spec, *arrays):
    @custom_vmap
    def run(*arrays):
      return op(spec, *arrays)

    @run.def_vmap
    def rule(axis_size, in_batched, *arrays):
      return _fold_vmap(run, axis_size, in_batched, arrays, in_b, out_b)

    return run(*arrays)

  call.__name__ = name
  return call


def _fold_vmap(run, size, in_batched, arrays, in_b, out_b):
  """vmap of the op: the mapped axis (leading) joined with the batch dim."""
  if any(batched and axis is None for batched, axis in zip(in_batched, in_b)):
    def one(i):
      return run(*[a[i] if batched else a for a, batched in zip(arrays, in_batched)])
    outs = tuple(jax.lax.map(one, jnp.arange(size)))
    return outs, (True,) * len(outs)
  folded = []
  for a, batched, axis in zip(arrays, in_batched, in_b):
    if axis is not None:
      if not batched:
        a = jnp.broadcast_to(a[None], (size,) + a.shape)
      a = jnp.moveaxis(a, 0, axis)
      a = a.reshape(a.shape[:axis] + (size * a.shape[axis + 1],) + a.shape[axis + 2:])
    folded.append(a)
  outs = run(*folded)
  unfolded = []
  for o, axis in zip(outs, out_b):
    o = o.reshape(o.shape[:axis] + (size, o.shape[axis] // size) + o.shape[axis + 1:])
    unfolded.append(jnp.moveaxis(o, axis, 0))
  return tuple(unfolded), (True,) * len(unfolded)


# --- naming the layer in errors raised while XLA partitions -------------------

_LAYER = contextvars.ContextVar("jint4_layer", default="int4_matmul")


def layer_name() -> str:
  """The path of the layer being traced (for errors raised at compile time,
  when the layer's own error context is gone)."""
  return _LAYER.get()


@contextlib.contextmanager
def naming(path: str):
  token = _LAYER.set(path)
  try:
    yield
  finally:
    _LAYER.reset(token)


# --- reading a layout ----------------------------------------------------------


def spec_axes(sharding, ndim: int):
  """Per dim, the mesh axes of a sharding's spec (a tuple, () for none)."""
  spec = tuple(getattr(sharding, "spec", ()) or ())
  out = []
  for i in range(ndim):
    entry = spec[i] if i < len(spec) else None
    if entry is None or entry is P.UNCONSTRAINED:
      out.append(_NONE)
    elif isinstance(entry, str):
      out.append((entry,))
    else:
      out.append(tuple(entry))
  return out


def mesh_sizes(mesh) -> Tuple[Tuple[str, int], ...]:
  return tuple((str(a), int(s)) for a, s in zip(mesh.axis_names,
                                                np.shape(mesh.devices)))


def read_layout(mesh, x_axes, x_dims, kernel_shape, *, block: Optional[int],
                name: str = "int4_matmul") -> Layout:
  """The `Layout` of x [B, N, D] (``x_axes``: per dim, its mesh axes;
  ``x_dims``: its sizes) and the kernel [B, D, C] (a shape with a sharding),
  checked against the op's constraints."""
  sizes = mesh_sizes(mesh)
  b, n, d = x_axes
  kb, kd, kc = spec_axes(kernel_shape.sharding, 3)
  # The kernel follows x's batch sharding (a batch axis elsewhere in the
  # kernel would be gathered); its features shard the output unless x
  # already uses one of their axes (then they are gathered, as codes).
  kd = tuple(a for a in kd if a not in b)
  kc = tuple(a for a in kc if a not in b)
  used = set(b + n + d)
  c = _NONE if any(a in used for a in kc) else kc
  layout = Layout(b=b, n=n, d=d, c=c, kd=kd, kc=kc, sizes=sizes)
  for dims, shape in (((b, n, d), x_dims), ((kb, kd, kc), kernel_shape.shape)):
    for axes, size in zip(dims, shape):
      if axes and size % layout.count(axes):
        raise ValueError(
            f"{name}: a dim of size {size} does not split evenly over mesh"
            f" axes {axes}; pad it or shard it over axes whose sizes divide"
            " it.")
  for axes, what in ((d, "x's contraction dim"), (kd, "the kernel's contraction dim")):
    if not axes:
      continue
    if block is None:
      raise ValueError(
          f"{name}: {what} is sharded over {axes}, which the searched"
          " Hadamard block (hadamard_block='auto') cannot follow; use a"
          " fixed Int4Config(hadamard_block=...) that divides each shard.")
    shard = x_dims[2] // layout.count(axes)
    if shard % block or shard % 8:
      need = block * 8 // math.gcd(block, 8)
      raise ValueError(
          f"{name}: a shard of {what} holds {shard} elements, which the"
          f" Hadamard block {block} (and the residual's 8-element bytes) must"
          f" divide: the block would straddle shards. Shard that dim over"
          f" fewer devices (so each shard holds a multiple of {need}), or use"
          f" a smaller Int4Config(hadamard_block=...).")
  return layout


def named(mesh, spec) -> NamedSharding:
  return NamedSharding(mesh, spec)


def entry(axes: Axes):
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else tuple(axes)


def warn_replicated(name: str, why: str) -> None:
  """The op runs with gathered operands: said once per reason."""
  if (name, why) not in _warned:
    _warned.add((name, why))
    warnings.warn(f"{name}: {why}; its operands are gathered to every device.",
                  RuntimeWarning, stacklevel=3)


_warned: set = set()

