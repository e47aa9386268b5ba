"""The run folder's writes are atomic: a writer that fails half-way leaves the old file whole and no
temporary file behind, and every method's save goes through that one writer."""

import pytest
import torch

from softprompt.backbone import Backbone
from softprompt.methods import method_class
from softprompt.run import atomic_file, write_atomic
from softprompt.taskfile import load_task
from softprompt.train import _task_for

from helpers import write_task


def test_a_write_that_fails_half_way_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "task.json"
    write_atomic(path, "old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half of the ne")
        raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task.json"]


def test_the_temporary_file_keeps_the_suffix_writers_choose_their_format_by(tmp_path):
    with atomic_file(tmp_path / "learning_curve.png") as tmp:
        assert tmp.suffix == ".png" and tmp.name.startswith(".") and tmp.parent == tmp_path
        tmp.write_bytes(b"png")
    assert (tmp_path / "learning_curve.png").read_bytes() == b"png"


# each method's save, and the library call it writes its tensors with
WRITERS = {
    "prompt": "softprompt.soft_prompt.save_file",
    "prefix": "softprompt.methods.prefix.save_file",
    "lora": "softprompt.methods.lora.save_file",
    "full": "softprompt.methods.full.save_model",
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_a_method_s_save_that_fails_half_way_leaves_its_last_artifact_whole(name, tmp_path, tiny_model_dir, monkeypatch):
    backbone = Backbone.load(str(tiny_model_dir))
    spec = load_task(write_task(tmp_path, tiny_model_dir))
    task, _ = _task_for(spec, method_class(name), backbone)
    method = method_class(name).build(task, backbone)
    run = tmp_path / "run"
    run.mkdir()
    method.save(run)
    before = {f: (run / f).read_bytes() for f in method.files}
    with torch.no_grad():
        for p in method.trainable().values():
            p.add_(1.0)

    def dies_half_way(tensors_or_model, filename, *args, **kwargs):
        with open(filename, "wb") as out:
            out.write(b"\x00" * 64)  # part of a file, then the process is killed
        raise KeyboardInterrupt

    monkeypatch.setattr(WRITERS[name], dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        method.save(run)
    assert {f: (run / f).read_bytes() for f in method.files} == before
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]
