"""Ablation sweeps: `python -m mnv2_flax.sweep` (`__main__`), its driver, the
grid's points, worker processes, Slurm submission and the summary."""
