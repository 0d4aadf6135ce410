"""Test-wide JAX settings: fast CPU compiles.

XLA's CPU optimisation passes dominate this suite's time (jitting `init` of a
width-0.35 model: 17 s with them, 3.5 s without, on 2 cores); the tiny
programs under test run fast enough unoptimised.
"""

import jax

jax.config.update('jax_disable_most_optimizations', True)
