"""`python -m mnv2_flax.export` (`__main__`) and its library (`lib`)."""
