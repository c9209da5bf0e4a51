"""Row formatters: each format's prompt/completion (or text/label), field renames, bad-row reasons."""

from __future__ import annotations

import pytest

from finetune.core.errors import FinetuneError
from finetune.core.recipe import DataSpec
from finetune.data.formats import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, BadRow, format_row


def spec(fmt: str, **kw) -> DataSpec:
    return DataSpec(local_path="x", format=fmt, **kw)


@pytest.fixture(scope="module")
def tok(smollm_tokenizer_dir):
    from finetune.core.models import load_tokenizer
    from finetune.core.recipe import ModelSpec

    return load_tokenizer(ModelSpec(id=str(smollm_tokenizer_dir)))


class NoTemplate:
    chat_template = None


# --------------------------------------------------------------------------------------------
# alpaca


def test_alpaca_without_input():
    out = format_row({"instruction": "Name a colour.", "output": "Blue"}, spec("alpaca"), None)
    assert out == {"prompt": ALPACA_NO_INPUT.format(instruction="Name a colour."), "completion": "Blue"}
    assert out["prompt"].endswith("### Instruction:\nName a colour.\n\n### Response:\n")
    assert "### Input:" not in out["prompt"]


@pytest.mark.parametrize("blank", ["", "   ", None])
def test_alpaca_blank_input_uses_no_input_template(blank):
    row = {"instruction": "Name a colour.", "input": blank, "output": "Blue"}
    assert format_row(row, spec("alpaca"), None)["prompt"] == ALPACA_NO_INPUT.format(instruction="Name a colour.")


def test_alpaca_with_input():
    row = {"instruction": "Translate.", "input": "bonjour", "output": "hello"}
    out = format_row(row, spec("alpaca"), None)
    assert out["prompt"] == ALPACA_WITH_INPUT.format(instruction="Translate.", input="bonjour")
    assert "### Input:\nbonjour\n\n### Response:\n" in out["prompt"]
    assert out["completion"] == "hello"


# --------------------------------------------------------------------------------------------
# llama2_inst


def test_llama2_inst_splits_prompt_and_answer():
    out = format_row({"text": "<s>[INST] q [/INST] a </s>"}, spec("llama2_inst"), None)
    assert out == {"prompt": "[INST] q [/INST]", "completion": " a"}
    assert out["prompt"].endswith("[/INST]")


def test_llama2_inst_multi_turn_answers_last_turn():
    text = "<s>[INST] q1 [/INST] a1 </s><s>[INST] q2 [/INST] a2 </s>"
    out = format_row({"text": text}, spec("llama2_inst"), None)
    assert out["completion"] == " a2"
    assert out["prompt"].startswith("[INST] q1 [/INST] a1")
    assert out["prompt"].endswith("[INST] q2 [/INST]")


def test_llama2_inst_no_marker():
    with pytest.raises(BadRow, match=r"no '\[/INST\]' marker"):
        format_row({"text": "<s>just some text</s>"}, spec("llama2_inst"), None)


def test_llama2_inst_empty_answer():
    with pytest.raises(BadRow, match="empty answer"):
        format_row({"text": "<s>[INST] q [/INST] </s>"}, spec("llama2_inst"), None)


# --------------------------------------------------------------------------------------------
# chat and messages (SmolLM2's chat template)


def test_chat_renders_with_template(tok):
    out = format_row({"instruction": "What is 2 + 2?", "output": "4"}, spec("chat"), tok)
    assert out["completion"] == "4"
    assert out["prompt"] == tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True, tokenize=False
    )
    assert out["prompt"].endswith("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")


def test_chat_system_prompt(tok):
    out = format_row(
        {"instruction": "Hi", "output": "Hello"}, spec("chat", system_prompt="You are terse."), tok
    )
    assert out["prompt"].startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    assert out["prompt"].count("<|im_start|>system") == 1
    assert "SmolLM" not in out["prompt"]  # the template's own default system prompt is replaced


def test_chat_input_appended_to_instruction(tok):
    out = format_row({"instruction": "Translate.", "input": "bonjour", "output": "hello"}, spec("chat"), tok)
    assert "<|im_start|>user\nTranslate.\n\nbonjour<|im_end|>" in out["prompt"]


def test_chat_without_template_is_a_stage_error():
    with pytest.raises(FinetuneError, match="no chat template"):
        format_row({"instruction": "q", "output": "a"}, spec("chat"), NoTemplate())


def test_messages(tok):
    row = {
        "messages": [
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "Again."},
            {"role": "assistant", "content": "hi again"},
        ]
    }
    out = format_row(row, spec("messages"), tok)
    assert out["completion"] == "hi again"
    assert out["prompt"] == tok.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=False)
    assert "hi again" not in out["prompt"]
    assert out["prompt"].endswith("<|im_start|>user\nAgain.<|im_end|>\n<|im_start|>assistant\n")


def test_messages_system_prompt_not_duplicated(tok):
    row = {
        "messages": [
            {"role": "system", "content": "Own system."},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
        ]
    }
    out = format_row(row, spec("messages", system_prompt="Recipe system."), tok)
    assert "Own system." in out["prompt"]
    assert "Recipe system." not in out["prompt"]
    out = format_row({"messages": row["messages"][1:]}, spec("messages", system_prompt="Recipe system."), tok)
    assert out["prompt"].startswith("<|im_start|>system\nRecipe system.<|im_end|>")


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ("not a list", "not a non-empty list"),
        ([], "not a non-empty list"),
        (None, "missing field 'messages'"),
        ([{"role": "user", "content": "q"}], "last message is not a non-empty assistant turn"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], "non-empty assistant"),
        ([{"role": "user", "content": "q"}, "a"], "message 1 is text, not an object with role and content"),
        ([{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}],
         r"message 0 with role 'robot' \(use one of system, user, assistant\)"),
        ([{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}],
         "message 0 with content holding a number"),
        ([{"role": "assistant", "content": "a"}], "no prompt turns"),
    ],
)
def test_messages_bad_rows(tok, messages, reason):
    with pytest.raises(BadRow, match=reason):
        format_row({"messages": messages}, spec("messages", system_prompt="S"), tok)


# --------------------------------------------------------------------------------------------
# prompt_completion and text_label


def test_prompt_completion():
    out = format_row({"prompt": "2+2=", "completion": "4", "extra": 1}, spec("prompt_completion"), None)
    assert out == {"prompt": "2+2=", "completion": "4"}


def test_prompt_completion_non_text():
    with pytest.raises(BadRow, match="field 'completion' holding a number, not text"):
        format_row({"prompt": "2+2=", "completion": 4}, spec("prompt_completion"), None)


@pytest.mark.parametrize("label", [0, 1, 2])
def test_text_label_in_range(label):
    out = format_row({"text": "good film", "label": label}, spec("text_label"), None, num_labels=3)
    assert out == {"text": "good film", "label": label}


def test_text_label_from_csv_text():
    assert format_row({"text": "t", "label": "1"}, spec("text_label"), None)["label"] == 1


@pytest.mark.parametrize("label", [2, -1, True, 0.5, "pos"])
def test_text_label_out_of_range(label):
    with pytest.raises(BadRow, match=r"outside 0\.\.1"):
        format_row({"text": "good film", "label": label}, spec("text_label"), None, num_labels=2)


def test_text_label_missing_label():
    with pytest.raises(BadRow, match="missing field 'label'"):
        format_row({"text": "good film"}, spec("text_label"), None)


# --------------------------------------------------------------------------------------------
# field renames and bad-row reasons


def test_fields_rename_alpaca():
    s = spec("alpaca", fields={"instruction": "question", "output": "answer"})
    out = format_row({"question": "Why?", "answer": "Because."}, s, None)
    assert out["completion"] == "Because."
    assert "### Instruction:\nWhy?\n" in out["prompt"]


def test_fields_rename_names_raw_key_when_missing():
    s = spec("alpaca", fields={"output": "answer"})
    with pytest.raises(BadRow, match="missing field 'answer'"):
        format_row({"instruction": "Why?", "output": "ignored"}, s, None)


def test_fields_rename_text_label():
    s = spec("text_label", fields={"text": "review", "label": "sentiment"})
    assert format_row({"review": "meh", "sentiment": 0}, s, None) == {"text": "meh", "label": 0}


@pytest.mark.parametrize(
    ("fmt", "row", "reason"),
    [
        ("alpaca", {"output": "a"}, "missing field 'instruction'"),
        ("alpaca", {"instruction": "q"}, "missing field 'output'"),
        ("alpaca", {"instruction": "  ", "output": "a"}, "missing field 'instruction'"),
        ("alpaca", {"instruction": "q", "output": ""}, "missing field 'output'"),
        ("alpaca", {"instruction": "q", "output": None}, "missing field 'output'"),
        ("llama2_inst", {"content": "x"}, "missing field 'text'"),
        ("prompt_completion", {"prompt": "p", "completion": "\n"}, "missing field 'completion'"),
        ("text_label", {"text": "", "label": 1}, "missing field 'text'"),
    ],
)
def test_bad_row_reasons(fmt, row, reason):
    with pytest.raises(BadRow) as info:
        format_row(row, spec(fmt), None)
    assert str(info.value) == reason


def test_row_not_an_object():
    with pytest.raises(BadRow, match="row is not an object"):
        format_row(["instruction", "output"], spec("alpaca"), None)
