"""What results.json records besides metrics."""

import jax

from mnv2_flax.train import reporting


def test_results_name_what_a_runs_bits_depend_on():
  bits = reporting.bits_depend_on()
  assert bits['backend'] == 'cpu' and bits['jax'] == jax.__version__
  assert bits['cpu_kernels'] in ('built', 'pure JAX') and bits['cpu']
