"""The chat command, driven through CliRunner with scripted input (tiny random model, fake classifier)."""

import re

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app


def chat(tmp_path, model_dir, text, **generate):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"generate": {"k": 3, "max_new_tokens": 8, **generate}}))
    return CliRunner().invoke(app, ["chat", "--model", str(model_dir), "--safety", str(tmp_path / "safety"),
                                    "--params", str(params)], input=text)


def candidate_rows(output: str) -> list[str]:
    return [line for line in output.splitlines() if re.match(r"^  [ *] +\d+ ", line)]


def test_each_line_gets_a_reply_with_its_rot_safety_and_the_rerankers_table(tmp_path, tiny_dialog_model_dir,
                                                                            fake_safety_scorer):
    result = chat(tmp_path, tiny_dialog_model_dir, "hi\nhow are you?\n/quit\nnever read\n")
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.count("bot> ") == 2 and out.count("  RoT: ") == 2 and "never read" not in out
    assert re.search(r"safety: casual \d\.\d{3} \| needs_caution \d\.\d{3} \| needs_intervention \d\.\d{3}", out)
    assert "score = 1 * fluency + 1 * prosociality" in out
    rows = candidate_rows(out)
    assert len(rows) == 2 * 3  # k rows per reply
    assert [r[2] for r in rows].count("*") == 2  # one winner per reply, listed first
    assert rows[0][2] == "*" and rows[3][2] == "*"
    # the classifier saw each reply in context: the second turn's context holds the first exchange
    (_, first_contexts), (_, second_contexts) = fake_safety_scorer.calls
    assert first_contexts == [["hi"]] * 3
    assert second_contexts[0][0] == "hi" and second_contexts[0][-1] == "how are you?" and len(second_contexts[0]) == 3
    assert out.rstrip().endswith("bye.")


def test_the_winner_has_the_best_score_and_reranking_can_be_switched_off(tmp_path, tiny_dialog_model_dir,
                                                                        fake_safety_scorer):
    on = chat(tmp_path, tiny_dialog_model_dir, "hi\n", k=4)
    scores = [float(re.split(r"\s+", row[3:].strip())[4]) for row in candidate_rows(on.output)]
    assert scores == sorted(scores, reverse=True)  # listed by rank, the winner first
    off = chat(tmp_path, tiny_dialog_model_dir, "hi\n", k=4, rerank=False)
    indices = [int(re.split(r"\s+", row[3:].strip())[0]) for row in candidate_rows(off.output)]
    assert indices == [0, 1, 2, 3] and candidate_rows(off.output)[0][2] == "*"
    assert "re-ranking off" in off.output


def test_the_same_seed_gives_the_same_conversation(tmp_path, tiny_dialog_model_dir, fake_safety_scorer):
    first = chat(tmp_path, tiny_dialog_model_dir, "hi\nhow are you?\n")
    second = chat(tmp_path, tiny_dialog_model_dir, "hi\nhow are you?\n")
    assert first.exit_code == 0 and "bot> " in first.stdout and first.stdout == second.stdout


def test_end_of_input_ends_the_chat(tmp_path, tiny_dialog_model_dir, fake_safety_scorer):
    result = chat(tmp_path, tiny_dialog_model_dir, "")
    assert result.exit_code == 0 and "bot> " not in result.output and "bye." in result.output


def test_a_model_without_a_tokenizer_is_a_one_line_error(tmp_path, tiny_dialog_model_dir, fake_safety_scorer):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_dialog_model_dir, folder)
    (folder / "tokenizer_config.json").unlink()
    result = chat(tmp_path, folder, "hi\n")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: {folder}: model folder has no tokenizer (tokenizer_config.json)"]


@pytest.mark.parametrize("k", [0, -1])
def test_k_below_one_is_a_config_error(tmp_path, tiny_dialog_model_dir, k):
    result = chat(tmp_path, tiny_dialog_model_dir, "hi\n", k=k)
    assert result.exit_code == 2 and "generate.k" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_every_generate_call_gets_the_attention_mask(tmp_path, tiny_dialog_model_dir, tiny_chat_model_dir,
                                                    fake_safety_scorer, capfd, monkeypatch):
    # Without the mask transformers may warn on the first reply (pad equals eos in the chat format) and
    # guess the mask from the pad token; chat passes it on every call, in both formats.
    import warnings

    from transformers.generation.utils import GenerationMixin

    calls, generate = [], GenerationMixin.generate

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("attention_mask"))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [chat(tmp_path, folder, "hi\n").output for folder in (tiny_dialog_model_dir, tiny_chat_model_dir)]
    assert all("bot> " in output for output in outputs)
    assert len(calls) == 2 and all(mask is not None for mask in calls)
    printed = "".join(outputs) + "".join(capfd.readouterr())
    assert "attention mask" not in printed.lower() and not [w for w in caught if "attention" in str(w.message).lower()]
