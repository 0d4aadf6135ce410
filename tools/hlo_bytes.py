"""Where a compiled program's memory traffic goes: two HLO texts side by side.

  python tools/hlo_bytes.py A.hlo[:N] B.hlo[:M] [--top=25]

For each top-level instruction of the ENTRY computation of a compiled HLO
(`compiled.as_text()`, e.g. from `tools/pack_tpu_cost.py --hlo_dir`), the
bytes it reads and writes: its result plus its operands, in the tiled
(padded) sizes of their layouts. Async copies and slices count their
destination twice (read and write); `ConcatBitcast` (slices placed side by
side) counts nothing; other async `-start`s (collectives, which a
one-device program has none of) count their result and operands, perhaps
twice. Grouped by instruction kind, pass (backward: under `transpose(`;
everything else, the optimizer's update too, is forward) and layer kind from
the op_name metadata (`depthwise_conv`, `expand_bn`, ...), and divided by N
(and M), the members of a pack, so a pack of 4 lines up with a run alone.
Only a layout's first tile pads (bf16's `(2,1)` packing is not counted).
XLA's own `bytes accessed` counts the same instructions its way (for the
pack of 1 of pack_tpu_cost.py: 394 MB against 363 MB here); the split by
layer is what this adds.
"""

import argparse
import collections
import re

_BYTES = dict(
  pred=1,
  s8=1,
  u8=1,
  f8e4m3fn=1,
  f8e5m2=1,
  s16=2,
  u16=2,
  bf16=2,
  f16=2,
  s32=4,
  u32=4,
  f32=4,
  s64=8,
  u64=8,
  f64=8,
  c64=8,
  c128=16,
)
_SHAPE = re.compile(
  r'\b(' + '|'.join(_BYTES) + r')\[([\d,]*)\]'
  r'(?:\{([\d,]*)(?::T\(([\d,]+)\))?[^}]*\})?'
)
_INSTRUCTION = re.compile(
  r'^(?:ROOT )?%?(\S+) = (.*?) ([\w-]+)\((.*?)\)(, .*)?$'
)
_FREE = {
  'parameter',
  'get-tuple-element',
  'tuple',
  'constant',
  'bitcast',
  'after-all',
  'partition-id',
  'replica-id',
}


def nbytes(text: str) -> int:
  """Bytes of the shapes in `text`, each padded to its layout's tile."""
  total = 0
  for dtype, dims, minor_to_major, tile in _SHAPE.findall(text):
    dims = [int(d) for d in dims.split(',') if d]
    if tile and minor_to_major:
      order = [int(d) for d in minor_to_major.split(',')]
      for size, dim in zip(
        reversed([int(t) for t in tile.split(',')]), order, strict=False
      ):
        dims[dim] = -(-dims[dim] // size) * size
    count = 1
    for d in dims:
      count *= d
    total += count * _BYTES[dtype]
  return total


def _entry(path: str) -> list[str]:
  lines, inside = [], False
  with open(path) as f:
    for line in f:
      if line.startswith('ENTRY'):
        inside = True
      elif inside and line.startswith('}'):
        break
      elif inside:
        lines.append(line.strip())
  return lines


def _group(op: str, op_name: str) -> str:
  layer = re.search(
    r'(stem|head)_(conv|bn)|classifier|block_\d+/(\w+)', op_name
  )
  if layer:
    layer = layer.group(3) or layer.group(0)
  else:
    layer = op_name.rsplit('/', 1)[-1][:30] or '-'
  if not op_name:
    stage = '-'
  elif 'transpose(' in op_name:
    stage = 'bwd'
  else:
    stage = 'fwd'
  return f'{op} {stage} {layer}'


def traffic(path: str) -> tuple[collections.Counter, collections.Counter]:
  """(bytes, instructions) per group of `path`'s ENTRY instructions."""
  sizes, by, count = {}, collections.Counter(), collections.Counter()
  for line in _entry(path):
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, result, op, operands, rest = match.groups()
    sizes[name] = nbytes(result)
    if op in _FREE or op.endswith('-done'):
      continue
    moved = sizes[name]
    if op == 'slice-start':  # ((source), slice, context)
      moved = 2 * (moved - sum(sizes.get(n, 0) for n in _names(operands)))
    elif 'ConcatBitcast' in (rest or ''):
      moved = 0
    elif op != 'copy-start':  # copy-start's result holds both ends
      moved += sum(sizes.get(n, 0) for n in _names(operands))
    meta = re.search(r'op_name="([^"]*)"', rest or '')
    group = _group(op, meta.group(1) if meta else '')
    by[group] += moved
    count[group] += 1
  return by, count


def _names(operands: str) -> list[str]:
  return re.findall(r'%([\w.-]+)', operands)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('programs', nargs='+', help='HLO text files, PATH[:N]')
  parser.add_argument('--top', type=int, default=25)
  args = parser.parse_args()
  columns = []
  for spec in args.programs:
    path, _, members = spec.partition(':')
    by, count = traffic(path)
    n = int(members or 1)
    columns.append(({k: v / n / 1e6 for k, v in by.items()}, count, spec))
  for by, _, spec in columns:
    print(f'{spec}: {sum(by.values()):,.0f} MB per member')
  groups = set().union(*(by for by, _, _ in columns))
  first, last = columns[0][0], columns[-1][0]
  if len(columns) == 1:  # the largest groups
    ranked = sorted(groups, key=lambda g: -first[g])
  else:  # the largest changes
    ranked = sorted(
      groups, key=lambda g: -abs(last.get(g, 0) - first.get(g, 0))
    )
  head = ' | '.join(f'{spec} MB/member (n)' for _, _, spec in columns)
  print(f'| group | {head} | last - first |')
  print('|---|' + '---|' * len(columns) + '---|')
  for g in ranked[: args.top]:
    cells = ' | '.join(f'{by.get(g, 0):.1f} ({n[g]})' for by, n, _ in columns)
    print(f'| {g} | {cells} | {last.get(g, 0) - first.get(g, 0):+.1f} |')


if __name__ == '__main__':
  main()
