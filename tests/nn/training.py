"""Small training loops the layer tests share (Linen and NNX)."""

import jax
import optax
from flax import nnx


def train_linen(loss_of, params, steps, lr=3e-3):
  """Adam under jax.jit on ``loss_of(params)``: (losses, the last gradient)."""
  tx = optax.adam(lr)

  @jax.jit
  def step(params, opt):
    loss, g = jax.value_and_grad(loss_of)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt, loss, g

  opt = tx.init(params)
  losses = []
  for _ in range(steps):
    params, opt, loss, g = step(params, opt)
    losses.append(float(loss))
  return losses, g


def optimizer(model, tx):
  """nnx.Optimizer over the Params, on this flax and older ones."""
  try:
    return nnx.Optimizer(model, tx, wrt=nnx.Param)
  except TypeError:  # older flax
    return nnx.Optimizer(model, tx)


def update(opt, model, grads):
  try:
    opt.update(model, grads)
  except TypeError:  # older flax
    opt.update(grads)
