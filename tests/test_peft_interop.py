import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from softprompt.artifact import load_classifier
from softprompt.cli import app
from softprompt.peft_interop import SIDECAR, export_peft, import_peft
from softprompt.run import ArtifactError, RunInfo
from softprompt.soft_prompt import SoftPrompt
from softprompt.taskfile import load_task
from softprompt.train import train

from helpers import quiet, write_task


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, tiny_backbone):
    folder = tmp_path_factory.mktemp("peft")
    train(
        load_task(write_task(folder, tiny_model_dir, steps=3)),
        folder / "run",
        backbone=tiny_backbone,
        console=quiet(),
    )
    return folder / "run"


def test_peft_loads_our_export_and_gives_the_same_logits(run, tmp_path, tiny_model_dir, tiny_backbone):
    export_peft(run, tmp_path / "adapter", tiny_backbone)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()

    clf, _ = load_classifier(run, tiny_backbone)
    rows = clf.encode([{"text": "a great film"}])
    ids = [t for t in rows.encoded.prefix + rows.encoded.bodies[0] if t >= 0]  # the text after {soft:4}
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor([ids])).logits[0, -1]
        out = clf.lm.run_rows(clf.lm.run_prefix(rows.encoded.prefix), rows.encoded.bodies)
        ours = tiny_backbone.logits(out.hidden[0, len(rows.encoded.bodies[0]) - 1])
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_import_restores_a_usable_run(run, tmp_path, tiny_backbone):
    export_peft(run, tmp_path / "adapter", tiny_backbone)
    import_peft(tmp_path / "adapter", tmp_path / "back", tiny_backbone)
    torch.testing.assert_close(SoftPrompt.load(tmp_path / "back").vectors, SoftPrompt.load(run).vectors)
    original, _ = load_classifier(run, tiny_backbone)
    imported, _ = load_classifier(tmp_path / "back", tiny_backbone)
    rows = [{"text": "a dull mess"}, {"text": "lovely"}]
    torch.testing.assert_close(
        imported.predict_proba(imported.encode(rows)), original.predict_proba(original.encode(rows))
    )


def test_import_with_a_task_file_and_wrong_token_count_is_refused(
    run, tmp_path, tiny_model_dir, tiny_backbone
):
    export_peft(run, tmp_path / "adapter", tiny_backbone)
    task = write_task(tmp_path, tiny_model_dir)
    task.write_text(task.read_text().replace("{soft:4}", "{soft:6}"))
    with pytest.raises(ArtifactError, match="4 virtual tokens but the template"):
        import_peft(tmp_path / "adapter", tmp_path / "back", tiny_backbone, load_task(task))


def test_soft_tokens_in_the_middle_cannot_be_exported(tmp_path, tiny_model_dir, tiny_backbone):
    task = write_task(tmp_path, tiny_model_dir, steps=1)
    task.write_text(task.read_text().replace("'{soft:4} Review: {text}", "'Review: {text} {soft:4}"))
    train(load_task(task), tmp_path / "mid", backbone=tiny_backbone, console=quiet())
    with pytest.raises(ArtifactError, match="cannot be expressed in PEFT"):
        export_peft(tmp_path / "mid", tmp_path / "adapter", tiny_backbone)


def _edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_import_refuses_an_adapter_whose_sidecar_names_another_model(
    run, tmp_path, tiny_model_dir, tiny_backbone
):
    export_peft(run, tmp_path / "adapter", tiny_backbone)
    _edit_json(tmp_path / "adapter" / SIDECAR, fingerprint="0123456789abcdef", model="other-model")
    pattern = (
        f"fingerprint 0123456789abcdef.*has fingerprint {tiny_backbone.fingerprint}.*--model other-model"
    )
    with pytest.raises(ArtifactError, match=pattern):
        import_peft(tmp_path / "adapter", tmp_path / "back", tiny_backbone)
    with pytest.raises(ArtifactError, match=pattern):  # a task file gives the template, not the model
        import_peft(
            tmp_path / "adapter",
            tmp_path / "back2",
            tiny_backbone,
            load_task(write_task(tmp_path, tiny_model_dir)),
        )
    assert not (tmp_path / "back").exists() and not (tmp_path / "back2").exists()


def test_import_records_how_the_base_model_was_checked(run, tmp_path, tiny_model_dir, tiny_backbone):
    export_peft(run, tmp_path / "adapter", tiny_backbone)
    assert import_peft(tmp_path / "adapter", tmp_path / "a", tiny_backbone).base_model_check == "fingerprint"
    (tmp_path / "adapter" / SIDECAR).unlink()  # a plain PEFT adapter: it names the model folder only
    spec = load_task(write_task(tmp_path, tiny_model_dir))
    assert (
        import_peft(tmp_path / "adapter", tmp_path / "b", tiny_backbone, spec).base_model_check == "same path"
    )
    assert RunInfo.read(tmp_path / "b").base_model_check == "same path"


def test_import_of_an_adapter_naming_an_unknown_base_is_kept_but_marked_unverified(
    run, tmp_path, tiny_model_dir, tiny_backbone
):
    export_peft(run, tmp_path / "adapter", tiny_backbone)
    (tmp_path / "adapter" / SIDECAR).unlink()
    _edit_json(tmp_path / "adapter" / "adapter_config.json", base_model_name_or_path="some-org/some-model")
    task = write_task(tmp_path, tiny_model_dir)
    result = CliRunner().invoke(
        app, ["import-peft", str(tmp_path / "adapter"), "--out", str(tmp_path / "c"), "--task", str(task)]
    )
    assert result.exit_code == 0, result.output
    check = RunInfo.read(tmp_path / "c").base_model_check
    assert check == "unverified: adapter names base model 'some-org/some-model'"
    assert "warning:" in result.output and check in result.output


def test_a_prompt_on_a_model_with_a_bos_token_is_not_exported(tmp_path, tiny_gemma):
    """PEFT would put the virtual tokens before Gemma's BOS, softprompt trains them after it."""
    task = write_task(tmp_path, tiny_gemma.spec, steps=1)
    train(load_task(task), tmp_path / "run", backbone=tiny_gemma, console=quiet())
    with pytest.raises(ArtifactError, match="PEFT puts its virtual tokens before it"):
        export_peft(tmp_path / "run", tmp_path / "adapter", tiny_gemma)
