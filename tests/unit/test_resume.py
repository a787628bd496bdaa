"""The config comparison behind resuming (the resumed runs are in tests/integration/test_resume.py)."""
from ml_ecs.run import trainer


def test_config_differences_names_nested_fields():
  saved = {'a': 1, 'train': {'rounds': 4, 'lr': 0.1}, 'gone': 1}
  current = {'a': 1, 'train': {'rounds': 5, 'lr': 0.1}, 'new': 2}
  assert trainer.config_differences(saved, current) == ['gone', 'new', 'train.rounds']
