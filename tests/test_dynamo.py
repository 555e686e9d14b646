"""fxllm as an NVIDIA Dynamo backend, the parts that need no Dynamo: request mapping, KV events, the frontend's
model folder. Dynamo's real frontend in front of two fxllm workers is in test_dynamo_cluster.py (opt-in)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fxllm.dynamo.kv_events import KVEventQueue, RemovedEvent, StoredEvent, block_hash_i64
from fxllm.dynamo.requests import prompt_token_ids, to_chunk, to_sampling_params
from fxllm.runtime.kv_cache_manager import KVCacheManager
from fxllm.runtime.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from fxllm.runtime.sampling_params import RequestOutputKind
from fxllm.runtime.sequence import Sequence

# ---- request and output mapping ----------------------------------------------------------------------


def test_sampling_options_and_stop_conditions_map_to_sampling_params() -> None:
    params = to_sampling_params({
        "token_ids": [1, 2],
        "sampling_options": {"temperature": 0.5, "top_p": 0.9, "top_k": 7, "seed": 3, "n": 1,
                             "frequency_penalty": 0.1, "presence_penalty": None},
        "stop_conditions": {"max_tokens": 12, "min_tokens": 2, "ignore_eos": False, "stop": ["\n\n"],
                            "stop_token_ids_hidden": [2, 1], "stop_token_ids": [5, 2], "stop_token_ids_visible": [6]},
        "output_options": {"logprobs": 3},
    })  # fmt: skip
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.5, 0.9, 7, 3)
    assert params.frequency_penalty == 0.1 and params.presence_penalty == 0.0
    assert (params.max_tokens, params.min_tokens, params.ignore_eos) == (12, 2, False)
    assert params.stop_token_ids == [2, 1, 5, 6]  # hidden (EOS) and visible, once each
    assert params.stop == []  # stop strings are the frontend's: it matches them on the text
    assert params.logprobs == 3 and params.output_kind is RequestOutputKind.DELTA
    assert to_sampling_params({"token_ids": [1]}).max_tokens is None  # until the context is full
    with pytest.raises(ValueError, match="n=1"):
        to_sampling_params({"token_ids": [1], "sampling_options": {"n": 2}})
    with pytest.raises(ValueError, match="temperature"):
        to_sampling_params({"token_ids": [1], "sampling_options": {"temperature": -1}})


def test_packed_token_ids() -> None:
    packed = b"".join(t.to_bytes(4, "little", signed=True) for t in (1, 49151, 7))
    assert prompt_token_ids({"token_ids": packed}) == [1, 49151, 7]
    assert prompt_token_ids({"token_ids": [3, 4]}) == [3, 4]
    with pytest.raises(ValueError, match="multiple of 4"):
        prompt_token_ids({"token_ids": b"\x01\x00\x00"})


def _output(
    ids: list[int], reason: str | None, logprobs: list[dict[int, Logprob]] | None = None
) -> RequestOutput:
    metrics = RequestMetrics(arrival_time=0.0, num_cached_tokens=4)
    completion = CompletionOutput(0, "", ids, reason, logprobs=logprobs)
    return RequestOutput("r", None, [1, 2, 3, 4, 5], [completion], reason is not None, metrics)


def test_chunks_carry_tokens_then_finish_reason_and_usage() -> None:
    lp = [{9: Logprob(9, -0.5, "a"), 4: Logprob(4, -1.5, "b")}]
    assert to_chunk(_output([9], None, lp), 1) == {
        "token_ids": [9], "index": 0, "log_probs": [-0.5],
        "top_logprobs": [[{"rank": 1, "token_id": 9, "token": "a", "logprob": -0.5},
                          {"rank": 2, "token_id": 4, "token": "b", "logprob": -1.5}]],
    }  # fmt: skip
    last = to_chunk(_output([7, 2], "stop"), 3)
    assert last["token_ids"] == [7, 2] and last["finish_reason"] == "stop"
    assert last["completion_usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                                        "prompt_tokens_details": {"cached_tokens": 4}}  # fmt: skip
    assert to_chunk(_output([], "abort"), 1)["finish_reason"] == "cancelled"
    assert to_chunk(_output([1], "length"), 4)["finish_reason"] == "length"


# ---- KV events from the prefix cache -------------------------------------------------------------------


def _prefill(kv: KVCacheManager, seq_id: int, tokens: list[int]) -> Sequence:
    seq = Sequence(seq_id=seq_id, token_ids=list(tokens), num_prompt_tokens=len(tokens), max_tokens=4,
                   arrival_time=0.0)  # fmt: skip
    assert kv.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    kv.cache_full_blocks(seq)
    return seq


def _drain(events: KVEventQueue) -> list[StoredEvent | RemovedEvent]:
    out = []
    while not events.events.empty():
        out.append(events.events.get_nowait())
    return out


def test_prefix_cache_stores_and_evictions_become_kv_events() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2)
    events = KVEventQueue()
    kv.observers.append(events)
    first = _prefill(kv, 0, [1, 2, 3, 4, 5])  # two full blocks, then a partial one (not cached)
    [stored] = _drain(events)
    assert isinstance(stored, StoredEvent)
    assert stored.token_ids == [1, 2, 3, 4] and stored.num_block_tokens == [2, 2]
    assert stored.parent_hash is None and len(set(stored.block_hashes)) == 2
    # Decoding fills the third block: one more stored event, chained to the second block.
    first.append_token(6)
    first.num_computed_tokens = 6
    kv.cache_full_blocks(first)
    [grown] = _drain(events)
    assert isinstance(grown, StoredEvent) and grown.token_ids == [5, 6]
    assert grown.parent_hash == stored.block_hashes[1]
    # The same prompt hits the cache: nothing new is stored.
    kv.free(first)
    second = _prefill(kv, 1, [1, 2, 3, 4, 5])
    assert second.num_cached_tokens == 4 and _drain(events) == []
    kv.free(second)
    # Another prompt needs every block: the LRU cached ones are evicted and reported as removed.
    _prefill(kv, 2, [9, 9, 8, 8, 7, 7, 6])
    news = _drain(events)
    removed = [h for e in news if isinstance(e, RemovedEvent) for h in e.block_hashes]
    assert sorted(removed) == sorted([*stored.block_hashes, *grown.block_hashes])
    assert [e.token_ids for e in news if isinstance(e, StoredEvent)] == [[9, 9, 8, 8, 7, 7]]
    kv.reset_prefix_cache()
    [cleared] = _drain(events)
    assert isinstance(cleared, RemovedEvent) and len(cleared.block_hashes) == 3
    kv.check_invariants()


def test_block_hash_is_a_signed_64_bit_int() -> None:
    assert block_hash_i64(b"\xff" * 32) == -1
    assert block_hash_i64(bytes(range(32))) == int.from_bytes(bytes(range(8)), "little")


# ---- the frontend's model folder -------------------------------------------------------------------------


def test_export_writes_what_the_frontend_reads(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    from fxllm.dynamo.model_folder import export_hf_tokenizer, has_frontend_files
    from fxllm.models.presets import preset_config
    from tests.server_fixtures import CHAT_TEMPLATE, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = preset_config("tiny-llama")
    config.architectures = None  # as a GGUF-built config has it
    # The generation config's EOS (here <s>, id 1) becomes the tokenizer's: the frontend stops at both.
    out = export_hf_tokenizer(
        tokenizer, config, GenerationConfig(eos_token_id=[1, 2]), "LlamaForCausalLM", tmp_path
    )
    assert has_frontend_files(out)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHAT_TEMPLATE
    assert tok_config["model_max_length"] == config.max_position_embeddings
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [1, 2]
    reloaded = AutoTokenizer.from_pretrained(str(out))
    assert reloaded.eos_token == "<s>" and tokenizer.eos_token == "</s>"
    text = "the quick brown fox jumps over"
    assert reloaded(text).input_ids == tokenizer(text).input_ids


def test_concurrent_exports_keep_one_complete_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fxllm.dynamo.model_folder as model_folder

    def fake_export(model: str, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True)
        for name in model_folder.FRONTEND_FILES:
            (out_dir / name).write_text(model)
        return out_dir

    monkeypatch.setattr(model_folder, "export_model_folder", fake_export)
    target = tmp_path / "smollm2"
    assert model_folder.export_model_folder_once("first", target) == target
    model_folder.export_model_folder_once("second", target)  # a later worker: its copy is dropped
    assert (target / "config.json").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2"]  # no staging folder left
