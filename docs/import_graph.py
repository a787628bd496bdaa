"""The import picture of the repository, drawn from the code (stdlib only: ast).

Reads every `import` / `from ... import` statement of the Python files under ml_ecs/,
studies/, benchmarks/ and launch/, including the ones inside functions (lazy imports), and

  (a) draws a package-level graph (nodes: ml_ecs.core, ml_ecs.algorithms, ..., studies,
      benchmarks, launch, configs) as a mermaid block in docs/architecture.md, between
      the marker comments `<!-- import-graph:start -->` and `<!-- import-graph:end -->`
      (only that block is rewritten; an edge is dashed when every import behind it sits
      inside a function);
  (b) checks the rules of the layout:
      - no import cycle between the modules of ml_ecs/ (module-level graph; lazy imports
        count too: a cycle hidden inside a function is still a cycle of the design);
      - nothing in ml_ecs/ imports studies, benchmarks or launch (the library stands alone).

  python docs/import_graph.py            # check, then rewrite the block in docs/architecture.md
  python docs/import_graph.py --check    # check only; exit status 1 on a violation, writes nothing

`--root DIR` runs on another tree (the tests use a small constructed package).
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
from collections.abc import Iterable, Iterator
from typing import NamedTuple

SOURCES = ('ml_ecs', 'studies', 'benchmarks', 'launch')   # the trees whose imports are read
INTERNAL = SOURCES + ('configs',)                          # import targets drawn in the graph
LIBRARY = 'ml_ecs'
FORBIDDEN_FROM_LIBRARY = ('studies', 'benchmarks', 'launch')
DOC = os.path.join('docs', 'architecture.md')
START, END = '<!-- import-graph:start -->', '<!-- import-graph:end -->'


class Import(NamedTuple):
  source: str      # importing module, e.g. 'ml_ecs.core.federation'
  target: str      # imported module, e.g. 'ml_ecs.algorithms.ml_ecs.amt'
  lazy: bool       # the statement sits inside a function
  path: str        # file of the statement, relative to the root
  line: int


def module_name(rel_path: str) -> str:
  """'ml_ecs/core/node.py' -> 'ml_ecs.core.node'; 'ml_ecs/core/__init__.py' -> 'ml_ecs.core'."""
  parts = rel_path[:-len('.py')].split(os.sep)
  if parts[-1] == '__init__':
    parts = parts[:-1]
  return '.'.join(parts)


def python_files(root: str, tops: Iterable[str] = SOURCES) -> Iterator[str]:
  for top in tops:
    base = os.path.join(root, top)
    for dirpath, dirnames, filenames in os.walk(base):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith('.') and d != '__pycache__')
      for name in sorted(filenames):
        if name.endswith('.py'):
          yield os.path.relpath(os.path.join(dirpath, name), root)


def _statements(tree: ast.AST) -> Iterator[tuple[ast.stmt, bool]]:
  """Every Import / ImportFrom node with whether it sits inside a function."""
  def walk(node: ast.AST, in_function: bool):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        yield child, in_function
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      yield from walk(child, inner)
  yield from walk(tree, False)


def read_imports(root: str, tops: Iterable[str] = SOURCES) -> tuple[set[str], list[Import]]:
  """(modules found under `tops`, their imports of modules of INTERNAL top-level names)."""
  files = list(python_files(root, tops))
  modules = {module_name(f) for f in files}
  imports = []
  for rel in files:
    src = module_name(rel)
    is_package = rel.endswith('__init__.py')
    with open(os.path.join(root, rel), encoding='utf-8') as f:
      tree = ast.parse(f.read(), filename=rel)
    for node, lazy in _statements(tree):
      for target in _targets(node, src, is_package, modules):
        if target.split('.')[0] in INTERNAL and target != src:
          imports.append(Import(src, target, lazy, rel, node.lineno))
  return modules, imports


def _targets(node: ast.stmt, src: str, is_package: bool, modules: set[str]) -> list[str]:
  if isinstance(node, ast.Import):
    return [alias.name for alias in node.names]
  # from X import a, b: a submodule X.a when one exists, else X itself.
  if node.level:
    package = src.split('.') if is_package else src.split('.')[:-1]
    package = package[:len(package) - (node.level - 1)]
    base = '.'.join(package + ([node.module] if node.module else []))
  else:
    base = node.module or ''
  out = []
  for alias in node.names:
    sub = f'{base}.{alias.name}'
    out.append(sub if sub in modules else base)
  return out


def node_of(module: str) -> str:
  """Package-level node of a module: 'ml_ecs.X' inside the library, else its top-level name."""
  parts = module.split('.')
  if parts[0] == LIBRARY:
    return '.'.join(parts[:2]) if len(parts) > 1 else LIBRARY
  return parts[0]


def package_edges(imports: Iterable[Import]) -> dict[tuple[str, str], bool]:
  """{(from node, to node): lazy only} over imports between different nodes."""
  edges: dict[tuple[str, str], bool] = {}
  for imp in imports:
    a, b = node_of(imp.source), node_of(imp.target)
    if a != b:
      edges[(a, b)] = edges.get((a, b), True) and imp.lazy
  return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of a directed graph as [a, b, ..., a], or None (iterative DFS, deterministic)."""
  colour: dict[str, int] = {}   # 1 on the stack, 2 done
  for start in sorted(graph):
    if colour.get(start):
      continue
    stack = [(start, iter(sorted(graph.get(start, ()))))]
    path = [start]
    colour[start] = 1
    while stack:
      node, children = stack[-1]
      child = next(children, None)
      if child is None:
        colour[node] = 2
        stack.pop()
        path.pop()
      elif colour.get(child) == 1:
        return path[path.index(child):] + [child]
      elif not colour.get(child):
        colour[child] = 1
        path.append(child)
        stack.append((child, iter(sorted(graph.get(child, ())))))
  return None


def package_cycles(edges: Iterable[tuple[str, str]]) -> list[list[str]]:
  """Groups of >= 2 package-level nodes that import each other, directly or not (allowed:
  only module cycles are errors; reported so that a split can aim at removing them)."""
  graph: dict[str, set[str]] = {}
  for a, b in edges:
    graph.setdefault(a, set()).add(b)
  def reach(a: str) -> set[str]:
    seen, todo = set(), [a]
    while todo:
      for n in graph.get(todo.pop(), ()):
        if n not in seen:
          seen.add(n)
          todo.append(n)
    return seen
  reachable = {n: reach(n) for n in graph}
  groups = []
  for n in sorted(graph):
    group = sorted({n} | {m for m in reachable[n] if n in reachable.get(m, ())})
    if len(group) > 1 and group not in groups:
      groups.append(group)
  return groups


def violations(modules: set[str], imports: list[Import]) -> list[str]:
  """The broken rules, one clear message each (empty: all good)."""
  out = []
  for imp in imports:
    if node_of(imp.source).split('.')[0] == LIBRARY and imp.target.split('.')[0] in FORBIDDEN_FROM_LIBRARY:
      kind = 'lazily imports' if imp.lazy else 'imports'
      out.append(f'{imp.path}:{imp.line}: {imp.source} {kind} {imp.target}: '
                 f'the library ({LIBRARY}/) must not import {"/".join(FORBIDDEN_FROM_LIBRARY)}')
  graph: dict[str, set[str]] = {}
  where: dict[tuple[str, str], Import] = {}
  for imp in imports:
    if imp.source.split('.')[0] == LIBRARY and imp.target in modules and imp.target.split('.')[0] == LIBRARY:
      graph.setdefault(imp.source, set()).add(imp.target)
      where.setdefault((imp.source, imp.target), imp)
  cycle = find_cycle(graph)
  if cycle:
    steps = []
    for a, b in zip(cycle, cycle[1:]):
      imp = where[(a, b)]
      steps.append(f'  {a} -> {b}  ({imp.path}:{imp.line}{", inside a function" if imp.lazy else ""})')
    out.append('import cycle between modules of ml_ecs/:\n' + '\n'.join(steps))
  return out


def mermaid(edges: dict[tuple[str, str], bool]) -> str:
  def ident(node: str) -> str:
    return node.replace('.', '_')
  nodes = sorted({n for e in edges for n in e})
  lines = ['```mermaid', 'graph LR']
  lines += [f'  {ident(n)}["{n}"]' for n in nodes]
  for (a, b), lazy in sorted(edges.items()):
    lines.append(f'  {ident(a)} {"-.->" if lazy else "-->"} {ident(b)}')
  lines.append('```')
  return '\n'.join(lines)


def rewrite_block(text: str, block: str) -> str:
  """`text` with what lies between the two markers replaced by `block`."""
  if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
    raise ValueError(f'{DOC} must hold the markers {START} and {END} once each, in that order')
  head, rest = text.split(START)
  _, tail = rest.split(END)
  return f'{head}{START}\n{block}\n{END}{tail}'


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--check', action='store_true', help='check only; never write')
  parser.add_argument('--root', default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      help='repository root (default: the one holding this script)')
  args = parser.parse_args(argv)
  modules, imports = read_imports(args.root)
  if not any(m.split('.')[0] == LIBRARY for m in modules):
    print(f'import_graph: no {LIBRARY}/ package under {args.root}', file=sys.stderr)
    return 2
  problems = violations(modules, imports)
  if problems:
    print('import_graph: the import rules are broken:', file=sys.stderr)
    for p in problems:
      print(f'- {p}', file=sys.stderr)
    return 1
  doc = os.path.join(args.root, DOC)
  edges = package_edges(imports)
  block = mermaid(edges)
  for group in package_cycles(edges):
    print(f'import_graph: note: packages that import each other (modules do not cycle): {", ".join(group)}')
  if args.check:
    current = open(doc, encoding='utf-8').read() if os.path.exists(doc) else ''
    if os.path.exists(doc) and START in current and rewrite_block(current, block) != current:
      print(f'import_graph: note: the graph in {DOC} is out of date '
            f'(python docs/import_graph.py rewrites it)', file=sys.stderr)
    print(f'import_graph: ok ({len(modules)} modules, {len(imports)} internal imports; '
          f'no cycle in {LIBRARY}/, no import of {"/".join(FORBIDDEN_FROM_LIBRARY)} from it)')
    return 0
  text = open(doc, encoding='utf-8').read()
  new = rewrite_block(text, block)
  if new != text:
    with open(doc, 'w', encoding='utf-8') as f:
      f.write(new)
  print(f'import_graph: {"rewrote" if new != text else "unchanged"} the graph in {DOC}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
