"""What every kind of the package shares, importing none of them: hardware
and XLA flags, device placement, the per-seed rule of packs, files written
whole, workdir locks, preemption, the compilation cache, tree diffs."""
