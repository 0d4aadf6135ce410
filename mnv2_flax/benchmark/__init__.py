"""`python -m mnv2_flax.benchmark` (`__main__`): the step's library (`lib`),
deviceless TPU compiles (`aot`) and the host input pipeline (`pipeline`)."""
