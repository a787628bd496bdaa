"""docs/import_graph.py: the repository keeps its import rules, and the detector catches breaks.

The constructed packages below fail these tests if the detector stops finding a cycle (also
one through a relative or a lazy import), stops flagging the library importing a study, or
writes when it must not.
"""
import importlib.util
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, 'docs', 'import_graph.py')
DOC_TEXT = '# Architecture\n\nbefore\n\n<!-- import-graph:start -->\nold\n<!-- import-graph:end -->\n\nafter\n'


def _load():
  spec = importlib.util.spec_from_file_location('import_graph', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _tree(tmp_path, files):
  for rel, text in {'docs/architecture.md': DOC_TEXT, 'ml_ecs/__init__.py': '', **files}.items():
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
  return tmp_path


def test_repository_keeps_the_rules():
  doc = os.path.join(ROOT, 'docs', 'architecture.md')
  before = open(doc).read()
  run = subprocess.run([sys.executable, SCRIPT, '--check'], capture_output=True, text=True, timeout=60)
  assert run.returncode == 0, run.stderr
  assert open(doc).read() == before, '--check must not write'
  assert '<!-- import-graph:start -->' in before and '<!-- import-graph:end -->' in before


def test_detects_a_module_cycle_through_relative_and_lazy_imports(tmp_path, capsys):
  root = _tree(tmp_path, {
      'ml_ecs/a/__init__.py': '',
      'ml_ecs/a/x.py': 'from ..b import y\n',              # relative, module level
      'ml_ecs/b/__init__.py': '',
      'ml_ecs/b/y.py': '''\
          def f():
            from ml_ecs.a import x                          # lazy
            return x
          ''',
  })
  graph = _load()
  assert graph.main(['--root', str(root)]) == 1             # not --check: still must not write
  err = capsys.readouterr().err
  assert 'import cycle' in err
  assert 'ml_ecs.a.x -> ml_ecs.b.y' in err and 'ml_ecs.b.y -> ml_ecs.a.x' in err
  assert (root / 'docs' / 'architecture.md').read_text() == DOC_TEXT


def test_detects_a_longer_cycle_and_no_false_one():
  graph = _load()
  assert graph.find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert graph.find_cycle({'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}) is None   # a diamond is no cycle


def test_flags_the_library_importing_a_study(tmp_path):
  root = _tree(tmp_path, {
      'ml_ecs/core/__init__.py': '',
      'ml_ecs/core/m.py': 'import studies.compare.grid\n',
      'studies/__init__.py': '',
      'studies/compare/__init__.py': '',
      'studies/compare/grid.py': 'from ml_ecs.core import m\n',
  })
  run = subprocess.run([sys.executable, SCRIPT, '--check', '--root', str(root)],
                       capture_output=True, text=True, timeout=60)
  assert run.returncode == 1
  assert 'ml_ecs/core/m.py:1' in run.stderr and 'studies.compare.grid' in run.stderr


def test_rewrites_only_the_block(tmp_path):
  root = _tree(tmp_path, {
      'ml_ecs/a/__init__.py': '',
      'ml_ecs/a/x.py': 'from ml_ecs.b import y\n',
      'ml_ecs/b/__init__.py': '',
      'ml_ecs/b/y.py': 'def f():\n  from ml_ecs.c import z\n',
      'ml_ecs/c/__init__.py': '',
      'ml_ecs/c/z.py': '',
      'studies/__init__.py': '',
      'studies/s.py': 'from ml_ecs.a import x\n',
  })
  graph = _load()
  assert graph.main(['--root', str(root)]) == 0
  text = (root / 'docs' / 'architecture.md').read_text()
  head, rest = text.split('<!-- import-graph:start -->')
  block, tail = rest.split('<!-- import-graph:end -->')
  assert head == '# Architecture\n\nbefore\n\n' and tail == '\n\nafter\n'
  assert 'old' not in block and '```mermaid' in block
  assert 'ml_ecs_a --> ml_ecs_b' in block         # module-level import: solid
  assert 'ml_ecs_b -.-> ml_ecs_c' in block        # only inside a function: dashed
  assert 'studies --> ml_ecs_a' in block
  assert graph.main(['--root', str(root)]) == 0   # idempotent
  assert (root / 'docs' / 'architecture.md').read_text() == text
