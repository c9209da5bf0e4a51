"""quantize: llama.cpp converts, quantizes and loads the GGUF; the checks really run and really fail."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from finetune.core.errors import FinetuneError
from finetune.core.outputs import write_jsonl
from finetune.core.recipe import QuantizeSpec

pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make install`")

PROMPTS = [f"<|im_start|>user\nWhat is {i} + {i}?<|im_end|>\n<|im_start|>assistant\n" for i in range(6)]
SPEC = QuantizeSpec(types=["f16", "q8_0", "q4_k_m"], verify_prompts=4, verify_tokens=8, ppl_rows=6)


@pytest.fixture
def prepared(tmp_path) -> Path:
    write_jsonl(tmp_path / "prepared" / "test.jsonl",
                [{"prompt": p, "completion": str(2 * i)} for i, p in enumerate(PROMPTS)])
    return tmp_path / "prepared"


def test_quantize_writes_and_verifies_every_type(tiny_llama_256, prepared, tmp_path):
    from finetune.stages.quantize import quantize

    metrics = quantize("tiny", SPEC, tiny_llama_256, prepared, tmp_path / "models", tmp_path / "metrics")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "README.md", "tiny-f16.Modelfile", "tiny-f16.gguf", "tiny-q4_k_m.Modelfile", "tiny-q4_k_m.gguf",
        "tiny-q8_0.Modelfile", "tiny-q8_0.gguf"]
    assert "FROM ./tiny-q8_0.gguf" in (tmp_path / "models" / "tiny-q8_0.Modelfile").read_text()
    assert sorted(p.name for p in (tmp_path / "metrics").iterdir()) == ["f16.json", "q4_k_m.json", "q8_0.json"]
    assert json.loads((tmp_path / "metrics" / "q8_0.json").read_text()) == metrics["q8_0"]
    bpw = {t: m["bits_per_weight"] for t, m in metrics.items()}
    # file bytes per weight: the tiny model carries a 49k-token vocabulary, so a little above nominal
    assert 15.5 < bpw["f16"] < 18 and 8 < bpw["q8_0"] < 10 and bpw["q4_k_m"] < 8
    assert "q4_k" in metrics["q4_k_m"]["tensor_types"]
    assert abs(metrics["f16"]["perplexity_ratio"] - 1) < 0.02
    # quantization costs something, and the table shows it next to the HF model's perplexity
    assert metrics["q4_k_m"]["perplexity"] != metrics["f16"]["perplexity"]
    assert all(m["hf_perplexity"] == metrics["f16"]["hf_perplexity"] for m in metrics.values())


def test_only_requested_types_are_kept(tiny_llama_256, prepared, tmp_path):
    from finetune.stages.quantize import quantize

    spec = SPEC.model_copy(update={"types": ["q8_0"]})
    quantize("tiny", spec, tiny_llama_256, prepared, tmp_path / "models", tmp_path / "metrics")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "README.md", "tiny-q8_0.Modelfile", "tiny-q8_0.gguf"]


def _convert_then(mutate):
    """A convert_f16 that damages the file it wrote (what a broken converter would do)."""
    from finetune.export import convert

    real = convert.convert_f16

    def convert(merged_dir, out_file):
        seconds = real(merged_dir, out_file)
        mutate(Path(out_file))
        return seconds

    return convert


def _corrupt_weights(path: Path) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r+")
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    data = tensor.data.view(np.uint16)
    data[:] = np.random.default_rng(0).integers(0, 2**14, size=data.shape, dtype=np.uint16)
    del reader


def _wrong_eos(path: Path) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r+")
    field = reader.fields["tokenizer.ggml.eos_token_id"]
    field.parts[field.data[0]][0] = 7
    del reader


@pytest.mark.parametrize(("mutate", "message"), [(_corrupt_weights, "differs from the merged model.*logit gap"),
                                                 (_wrong_eos, "EOS id is 7")])
def test_a_broken_gguf_fails_the_stage(tiny_llama_256, prepared, tmp_path, monkeypatch, mutate, message):
    from finetune.export import convert
    from finetune.stages.quantize import quantize

    monkeypatch.setattr(convert, "convert_f16", _convert_then(mutate))
    with pytest.raises(FinetuneError, match=message) as err:
        quantize("tiny", SPEC, tiny_llama_256, prepared, tmp_path / "models", tmp_path / "metrics")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "models").exists(), "a failed check leaves no output behind"


def test_unknown_type_is_a_one_line_error(tmp_path):
    from finetune.core.recipe import parse_recipe
    from finetune.export.convert import quantize_file

    with pytest.raises(FinetuneError, match="quantize.types"):
        parse_recipe({"name": "x", "model": {"id": "m"}, "data": {"local_path": "d", "format": "alpaca"},
                      "quantize": {"types": ["q4_k_x"]}}, "params.yaml")
    with pytest.raises(FinetuneError, match="not a llama.cpp type"):
        quantize_file(tmp_path / "a.gguf", tmp_path / "b.gguf", "q4_k_x", 1)


class _Tok:
    eos_token_id = 9

    def __call__(self, text):
        return {"input_ids": [1, 2, 3]}

    def decode(self, ids):
        return " ".join(map(str, ids))


class _HF:
    """Greedy HF stand-in: always answers [5, EOS]; at the first step token 5 leads token 6 by ``gap``."""

    device = "cpu"

    def __init__(self, gap=1.0):
        self.gap = gap

    def generate(self, ids, **kw):
        import torch

        first, second = torch.zeros(1, 10), torch.zeros(1, 10)
        first[0, 5], first[0, 6] = 1.0, 1.0 - self.gap
        second[0, 9] = 1.0

        class Out:
            sequences = torch.cat([ids, torch.tensor([[5, 9]])], dim=1)
            logits = (first, second)

        return Out()


def _reference(hf, max_new=8):
    """What the stage keeps of the HF model before llama.cpp loads a file: greedy tokens + step logits."""
    from finetune.export.checks import greedy_hf

    return [greedy_hf(hf, _Tok()("p")["input_ids"], max_new, {9})]


def test_generation_must_stop_at_eos_where_the_hf_model_does():
    from finetune.export.checks import check_generation

    same = [[5, 9]]  # llama.cpp's greedy tokens equal the HF model's
    assert check_generation(same, {"0": "stop"}, _reference(_HF()), _Tok(), {9}, "x.gguf", ["p"])["stopped"] == 1
    with pytest.raises(FinetuneError, match="does not stop at EOS"):
        check_generation(same, {"0": "length"}, _reference(_HF()), _Tok(), {9}, "x.gguf", ["p"])


def test_a_numerical_tie_ends_the_comparison_but_a_real_gap_fails():
    from finetune.export.checks import check_generation

    picks6 = [[6, 9]]  # llama.cpp's first token is 6 where the HF model's is 5
    counts = check_generation(picks6, {}, _reference(_HF(0.001), 4), _Tok(), {9}, "x.gguf", ["p"], 0.01)
    assert counts == {"matched": 0, "ties": 1, "stopped": 0}
    with pytest.raises(FinetuneError, match="logit gap 0.5"):
        check_generation(picks6, {}, _reference(_HF(0.5), 4), _Tok(), {9}, "x.gguf", ["p"], 0.01)


def test_llama_cpp_runs_in_a_process_without_torch(tiny_llama_256, tmp_path, monkeypatch):
    """llama.cpp's CUDA build crashes beside torch (gguf_process): the stages' llama.cpp calls go to a
    child that never imports it, errors come back as one line, and a child with torch loaded refuses."""
    import json
    import sys

    import torch  # noqa: F401 -- the caller holds torch, as the stage does

    from finetune.core import gguf_process
    from finetune.export.convert import convert_f16

    gguf_file = tmp_path / "t.gguf"
    convert_f16(tiny_llama_256, gguf_file)
    texts, device = gguf_process.generate(gguf_file, ["a", "b c"], 4, threads=1, n_ctx=256)
    assert len(texts) == 2 and device == "cpu" and "torch" in sys.modules
    with pytest.raises(FinetuneError, match="could not quantize t.gguf to q8_0") as err:
        gguf_process.call("quantize", {"src": str(gguf_file), "dst": str(tmp_path / "no" / "x.gguf"), "qtype": "q8_0",
                                       "ftype": "LLAMA_FTYPE_MOSTLY_Q8_0", "threads": 1})
    assert "\n" not in str(err.value)
    # in this (torch-holding) process the child's entry point refuses to answer
    monkeypatch.setitem(gguf_process.COMMANDS, "noop", lambda req: {})
    (tmp_path / "in.json").write_text("{}")
    gguf_process.main(["noop", str(tmp_path / "in.json"), str(tmp_path / "out.json")])
    assert "torch was imported" in json.loads((tmp_path / "out.json").read_text())["error"]


def _plan_and_reference(tiny_llama_256, prepared):
    from transformers import AutoTokenizer

    from finetune.export import checks
    from finetune.stages.quantize import QuantizePlan

    plan = QuantizePlan.resolve("tiny", SPEC, prepared)
    tok = AutoTokenizer.from_pretrained(tiny_llama_256)
    return plan, lambda: checks.reference(Path(tiny_llama_256), tok, list(plan.prompts), list(plan.texts),
                                          plan.verify_tokens)


def test_side_by_side_writes_the_same_files_and_numbers(tiny_llama_256, prepared, tmp_path):
    """What a GPU run does (files written beside the reference and the checks) equals the one-after-another run."""
    from finetune.stages.quantize import write_and_check

    plan, reference = _plan_and_reference(tiny_llama_256, prepared)
    runs = {}
    for beside in (False, True):
        out = tmp_path / str(beside)
        out.mkdir()
        runs[beside] = write_and_check(plan, Path(tiny_llama_256), out, reference, beside=beside)
    drop = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
    assert {t: drop(m) for t, m in runs[True].items()} == {t: drop(m) for t, m in runs[False].items()}
    for qtype in plan.types:
        name = plan.file(qtype)
        assert (tmp_path / "True" / name).read_bytes() == (tmp_path / "False" / name).read_bytes(), name


def test_a_failed_check_stops_the_files_after_it(tiny_llama_256, prepared, tmp_path, monkeypatch):
    from finetune.stages import quantize as stage

    plan, reference = _plan_and_reference(tiny_llama_256, prepared)

    def check_file(plan, ref, out_dir, qtype, seconds):
        raise FinetuneError(f"{qtype}: check failed")

    monkeypatch.setattr(stage, "check_file", check_file)
    with pytest.raises(FinetuneError, match="f16: check failed"):
        stage.write_and_check(plan, Path(tiny_llama_256), tmp_path, reference, beside=True)
    assert not (tmp_path / plan.file("q4_k_m")).exists()  # queued behind q8_0, never started


# --------------------------------------------------------------------- SentencePiece tokenizers (Llama-2, Code Llama)
@pytest.fixture(scope="module")
def spm_tokenizer_dir(tmp_path_factory) -> Path:
    """A Llama-2-style tokenizer folder: a SentencePiece BPE model (byte fallback) as tokenizer.model beside the
    tokenizer.json transformers builds from the same vocabulary (through a vocabulary-only GGUF: converting the
    .model file itself needs protobuf)."""
    import gguf
    import sentencepiece
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("spm")
    corpus = out / "corpus.txt"
    corpus.write_text((Path(__file__).parents[1] / "README.md").read_text() * 2 + "\n".join(PROMPTS))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "m"), vocab_size=512, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(out / "m.model"))
    kinds = [(sp.is_unknown, gguf.TokenType.UNKNOWN), (sp.is_control, gguf.TokenType.CONTROL),
             (sp.is_byte, gguf.TokenType.BYTE)]
    writer = gguf.GGUFWriter(str(out / "vocab.gguf"), "llama")
    for add, value in ((writer.add_block_count, 1), (writer.add_context_length, 512), (writer.add_embedding_length, 64),
                       (writer.add_head_count, 2), (writer.add_feed_forward_length, 128)):
        add(value)
    writer.add_tokenizer_model("llama")
    ids = range(sp.get_piece_size())
    writer.add_token_list([sp.id_to_piece(i) for i in ids])
    writer.add_token_scores([sp.get_score(i) for i in ids])
    writer.add_token_types([next((t for is_kind, t in kinds if is_kind(i)), gguf.TokenType.NORMAL) for i in ids])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    folder = out / "tokenizer"
    AutoTokenizer.from_pretrained(out, gguf_file="vocab.gguf").save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes((out / "m.model").read_bytes())
    text = "def add(a, b):\n    return a + b  # 🚀"
    assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == [1, *sp.encode(text)]
    return folder


def _spm_llama(out: Path, tokenizer, save) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    save(tokenizer, out)
    return out


def test_a_sentencepiece_tokenizer_reaches_the_gguf(spm_tokenizer_dir, prepared, tmp_path):
    """transformers 5 saves tokenizer.json only; save_tokenizer keeps tokenizer.model beside it, and with it the
    f16 GGUF tokenizes every prompt as the HF model does. Without it llama.cpp's converter gives every token
    the same score and the check fails: what a Llama-2 recipe's merged folder was before."""
    from transformers import AutoTokenizer

    from finetune.core.models import save_tokenizer
    from finetune.stages.quantize import quantize

    tokenizer = AutoTokenizer.from_pretrained(spm_tokenizer_dir)
    spec = SPEC.model_copy(update={"types": ["f16"]})
    kept = _spm_llama(tmp_path / "kept", tokenizer, save_tokenizer)
    assert (kept / "tokenizer.model").read_bytes() == (spm_tokenizer_dir / "tokenizer.model").read_bytes()
    metrics = quantize("spm", spec, kept, prepared, tmp_path / "models", tmp_path / "metrics")
    assert metrics["f16"]["greedy_matched"] + metrics["f16"]["greedy_ties"] == SPEC.verify_prompts

    lost = _spm_llama(tmp_path / "lost", tokenizer, lambda tok, out: tok.save_pretrained(out))
    assert not (lost / "tokenizer.model").exists()
    with pytest.raises(FinetuneError, match="tokenizes differently"):
        quantize("spm", spec, lost, prepared, tmp_path / "models-lost", tmp_path / "metrics-lost")


def test_text_after_a_special_token_tokenizes_as_llama_cpp_reads_it(spm_tokenizer_dir, tmp_path):
    """A multi-turn Llama-2 prompt (guanaco's ``</s><s>[INST]``): transformers 5 builds the tokenizer with the
    word-start mark only at the very start, llama.cpp puts it after every special token, so the f16 check
    failed at the second turn on the 7B GPU run. Every stage loads through open_tokenizer, which tokenizes
    as llama.cpp does; the plain transformers-5 tokenizer still fails the check."""
    from transformers import AutoTokenizer

    from finetune.core import gguf_process
    from finetune.core.models import open_tokenizer, save_tokenizer
    from finetune.export import checks
    from finetune.stages.quantize import quantize

    turns = "<s>[INST] What does def do? [/INST] It defines a function. </s><s>[INST] And return? [/INST]"
    prepared = tmp_path / "prepared"
    write_jsonl(prepared / "test.jsonl", [{"prompt": turns, "completion": "x"}] * SPEC.verify_prompts)
    spec = SPEC.model_copy(update={"types": ["f16"]})

    tokenizer = open_tokenizer(spm_tokenizer_dir)
    ids = tokenizer(turns)["input_ids"]
    second = ids.index(2) + 2  # the text after the second turn's <s>
    assert tokenizer.convert_ids_to_tokens(ids[second]).startswith("\u2581")
    merged = _spm_llama(tmp_path / "merged", tokenizer, save_tokenizer)
    assert open_tokenizer(merged)(turns)["input_ids"] == ids  # saved so that a reload builds the same
    metrics = quantize("spm", spec, merged, prepared, tmp_path / "models", tmp_path / "metrics")
    assert metrics["f16"]["greedy_matched"] + metrics["f16"]["greedy_ties"] == SPEC.verify_prompts

    plain = AutoTokenizer.from_pretrained(spm_tokenizer_dir)
    assert not plain.convert_ids_to_tokens(plain(turns)["input_ids"][second]).startswith("\u2581")
    cpp = gguf_process.call("inspect", {
        "path": str(tmp_path / "models" / "spm-f16.gguf"), "n_ctx": 256, "threads": 1,
        "specials": checks.specials(plain), "prompts": [turns], "prompt_ids": [], "max_new": 0, "eos": [2],
        "stop_check": [], "sequences": [ids[:8]]})
    assert cpp["prompts"] == [ids]
    with pytest.raises(FinetuneError, match="prompt 0 tokenizes differently"):
        checks.check_tokenizer(cpp, plain, [turns], "f16")


def test_space_after_specials_leaves_other_tokenizers_alone(tiny_llama_256):
    from transformers import AutoTokenizer

    from finetune.core.models import open_tokenizer

    text = "<|im_start|>user\nhi<|im_end|>"
    assert open_tokenizer(tiny_llama_256)(text)["input_ids"] == AutoTokenizer.from_pretrained(tiny_llama_256)(
        text)["input_ids"]


def test_the_bench_writes_sentencepiece_models_that_sentencepiece_reads(spm_tokenizer_dir, tmp_path):
    """bench/train_speed.py rebuilds Llama-2's tokenizer.model from llama.cpp's vocabulary GGUF by hand."""
    import sys

    import sentencepiece

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from train_speed import sentencepiece_model

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_tokenizer_dir / "tokenizer.model"))
    ids = range(sp.get_piece_size())
    kind = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in ids]
    (tmp_path / "re.model").write_bytes(sentencepiece_model([sp.id_to_piece(i) for i in ids],
                                                            [sp.get_score(i) for i in ids], kind))
    again = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "re.model"))
    texts = [(Path(__file__).parents[1] / "README.md").read_text(), "  two  spaces\n\ttab ünïcödé 🚀 end ", *PROMPTS]
    assert [again.encode(t) for t in texts] == [sp.encode(t) for t in texts]
    assert again.get_piece_size() == sp.get_piece_size() and again.bos_id() == 1 and again.eos_id() == 2
