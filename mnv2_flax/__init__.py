"""MobileNetV2 in JAX/Flax. The modules users import sit here (`models`,
`checkpointing`, `convert`, `preprocessing`, `stats`, `defaults`,
`evaluate`); the rest is grouped by kind: `data/`, `train/`, `sweep/`,
`export/`, `benchmark/`, `cpu/` and `runtime/` (README, "Layout").

Modules that lived here before 0.2.0 still import under their old names, with
a DeprecationWarning, until 0.3.0: scripts, and the tasks of a Slurm sweep
queued before an upgrade (submitit pickles `mnv2_flax.sweep_submit`), keep
working meanwhile.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# Old module -> where its names live now (searched in order).
_MOVED = {
  'aot': ('benchmark.aot',),
  'benchmark_lib': ('benchmark.lib',),
  'compilation_cache': ('runtime.compilation_cache',),
  'digits': ('data.digits',),
  'divergence': ('train.divergence',),
  'export_lib': ('export.lib',),
  'fashion_mnist': ('data.fashion_mnist',),
  'files': ('runtime.files',),
  'finetune': ('train.finetune',),
  'hardware': ('runtime.hardware', 'train.reporting'),
  'input_pipeline': (
    'data.input_pipeline',
    'data.prepare',
    'data.transforms',
    'benchmark.pipeline',
  ),
  'per_seed': ('runtime.per_seed',),
  'placement': ('runtime.placement',),
  'preemption': ('runtime.preemption',),
  'programs': ('train.programs',),
  'reporting': ('train.reporting',),
  'steps': ('train.steps',),
  'summary': ('sweep.summary',),
  'sweep_points': ('sweep.grid',),
  'sweep_submit': ('sweep.slurm',),
  'sweep_workers': ('sweep.workers',),
  'train_lib': ('train.train_lib',),
  'training_state': ('train.training_state',),
  'tree_diff': ('runtime.tree_diff',),
  'workdir_lock': ('runtime.workdir_lock',),
}


class _OldNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Imports `mnv2_flax.<old>` as a module that forwards every name to the
  modules of `_MOVED[old]`, loaded on first use."""

  def find_spec(self, fullname, path=None, target=None):
    del path, target
    package, _, old = fullname.rpartition('.')
    if package == __name__ and old in _MOVED:
      return importlib.util.spec_from_loader(fullname, self)
    return None

  def create_module(self, spec):
    return None  # the default module

  def exec_module(self, module):
    old = module.__name__.rpartition('.')[2]
    targets = [f'{__name__}.{new}' for new in _MOVED[old]]
    warnings.warn(
      f'{module.__name__} moved to {" and ".join(targets)} in 0.2.0; the '
      'old name goes in 0.3.0.',
      DeprecationWarning,
      stacklevel=2,
    )

    def forward(name):
      for target in targets:
        new = importlib.import_module(target)
        if hasattr(new, name):
          return getattr(new, name)
      raise AttributeError(f'{module.__name__} (now {targets[0]}): no {name}')

    module.__getattr__ = forward


if not any(isinstance(f, _OldNames) for f in sys.meta_path):
  sys.meta_path.append(_OldNames())
