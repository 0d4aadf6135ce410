"""Fast paths for XLA's CPU backend; the switch is `cpu.fast_path`."""
