"""Every task file under examples/ is valid, and the data files it names exist (those over the
shared datasets only where ../shared is present)."""

from pathlib import Path

import pytest

from softprompt import Template, load_task
from softprompt.data import load_examples

from conftest import SHARED_DATA

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("task_file", EXAMPLES, ids=lambda p: p.name)
def test_example_task_file_is_valid_and_its_rows_read(task_file):
    spec = load_task(task_file)
    train = spec.path(spec.data.train)
    if "shared" in train.parts and not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present")
    template = Template.parse(spec.template, slot="target" if spec.kind == "generation" else "label")
    column = spec.data.target if spec.kind == "generation" else spec.data.label
    keep = [spec.data.tests] if spec.data.tests else None
    for path in filter(None, [spec.data.train, spec.data.dev]):
        rows = load_examples(spec.path(path), template.fields, spec.data.columns, column, keep=keep)
        assert rows
