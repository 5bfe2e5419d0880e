"""The installed Qwen2.5-Coder GGUFs: the pinned checksums, what the files hold, and one shared tokenizer.

Skipped when `make models` has not run (they are 1.6 GB).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from specdec.file_cache import sha256_file
from specdec.models.sources import ARTIFACTS, MODELS_DIR, load_tokenizer

pytestmark = pytest.mark.real_models

TARGET, DRAFTER = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"
VOCAB = 151_936


def _installed(name: str) -> Path:
    path = MODELS_DIR / ARTIFACTS[name].filename
    if not path.is_file():
        pytest.skip(f"{name} is not installed in {MODELS_DIR}: run `make models`")
    return path


def _facts(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def value(key):
        return reader.fields[key].contents()

    return dict(arch=value("general.architecture"), layers=value("qwen2.block_count"),
                heads=value("qwen2.attention.head_count"), kv_heads=value("qwen2.attention.head_count_kv"),
                hidden=value("qwen2.embedding_length"), vocab=len(value("tokenizer.ggml.tokens")),
                types=Counter(tensor.tensor_type.name for tensor in reader.tensors),
                lm_head=next(t.tensor_type.name for t in reader.tensors if t.name == "output.weight"))

@pytest.mark.parametrize("name", [TARGET, DRAFTER])
def test_installed_files_match_their_pinned_checksums(name):
    path = _installed(name)
    assert path.stat().st_size == ARTIFACTS[name].size
    assert sha256_file(path) == ARTIFACTS[name].sha256


def test_the_target_is_a_28_layer_qwen2_in_k_quants():
    facts = _facts(_installed(TARGET))
    assert facts.pop("types") == Counter(Q4_K=169, Q6_K=29, F32=141)
    assert facts == dict(arch="qwen2", layers=28, heads=12, kv_heads=2, hidden=1536, vocab=VOCAB, lm_head="Q6_K")


def test_the_drafter_is_a_24_layer_qwen2_with_the_same_vocabulary():
    facts = _facts(_installed(DRAFTER))
    assert (facts["arch"], facts["layers"], facts["hidden"], facts["vocab"]) == ("qwen2", 24, 896, VOCAB)
    assert set(facts["types"]) == {"Q5_0", "Q8_0", "Q6_K", "Q4_K", "F32"}


def test_target_and_drafter_share_one_tokenizer():
    from transformers import AutoTokenizer

    # Each read from its file the same way (a converted copy, saved by transformers, gains Qwen2's NFC
    # normalizer): the whole tokenizer, vocabulary, merges, added tokens, normalizer and pre-tokenizer.
    target, drafter = (AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
                       for path in (_installed(TARGET), _installed(DRAFTER)))
    assert len(target) == len(drafter) == VOCAB
    assert json.loads(target.backend_tokenizer.to_str()) == json.loads(drafter.backend_tokenizer.to_str())
    served = load_tokenizer(TARGET)  # what the coordinator encodes with
    assert served.get_vocab() == target.get_vocab() and served.eos_token == target.eos_token
    text = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 斐波那契"
    assert target.decode(target.encode(text)) == text
    assert target.eos_token == drafter.eos_token == "<|im_end|>"


def _resident_bytes() -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) * 1024


@pytest.mark.real_target
def test_the_target_loads_quantised_in_its_file_size_and_decodes_the_same_tokens_in_any_batch():
    import gc

    import torch

    from specdec.compute.model_runner import ModelRunner
    from specdec.compute.quant_weights import QuantLinear
    from specdec.models.loader import load_model
    from test_gguf_quantised import greedy_tokens

    path = _installed(TARGET)
    loaded = load_model(TARGET)
    gc.collect()
    assert _resident_bytes() <= 1.5 * path.stat().st_size
    assert sum(isinstance(m, QuantLinear) for m in loaded.model.modules()) == 28 * 7 + 1
    runner = ModelRunner(loaded.model, loaded.device, small_gemm=True, gguf_path=loaded.gguf_path)
    questions = ["Write a Python function that reverses a string.", "What does `git rebase` do?",
                 "Fix: for i in range(len(xs)) print(xs[i])"]
    prompts = [loaded.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                    tokenize=True, return_dict=True)["input_ids"] for q in questions]

    with torch.inference_mode():
        together = greedy_tokens(runner, prompts, 12)
        assert [greedy_tokens(runner, [p], 12)[0] for p in prompts] == together
    assert "def" in loaded.tokenizer.decode(together[0])  # a function, as asked
