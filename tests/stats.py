"""Tolerances for the statistical tests (fixed seeds, bounded draws)."""

import math

# Allowed probability that a statistical check of a correct implementation
# fails by chance.
DELTA = 1e-6


def hoeffding_tol(gap, n_draws, n_elems=1, delta=DELTA):
  """A bound on |mean of n_draws samples - E| holding for n_elems elements.

  Each sample lies in an interval of width ``gap``, so by Hoeffding
  P(|mean - E| >= t) <= 2 exp(-2 n t^2 / gap^2); a union bound over n_elems
  elements (or checks) gives failure probability <= delta for
  t = gap * sqrt(ln(2 n_elems / delta) / (2 n)): the 1/sqrt(n) rate.
  """
  return gap * math.sqrt(math.log(2 * n_elems / delta) / (2 * n_draws))
