"""The compile cache: a warm start serves the cold start's post-pass graph (weights bound from the loaded
model, derived ones replayed), every key part that changes the graph misses, bad entries are rebuilt."""

from __future__ import annotations

import json
import logging
import operator
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.fx import GraphModule

from fxllm import LLM, SamplingParams
from fxllm.compiler import cache_key
from fxllm.compiler.cache import GraphCache
from fxllm.ops.linear import pack_linear_weight
from fxllm.passes.graph_utils import arg, fetch_attr, is_op
from fxllm.passes.registry import PassContext, PassResult, register_pass, unregister_pass
from fxllm.serve.cli import main

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9]]
BASE = ["model.model=tiny-llama", "compile.backend=eager", "cache.num_blocks=64"]


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache root for this test; the C++ kernels are loaded first, from the usual place, so they
    are not rebuilt into it. The environment the cache sets is restored afterwards."""
    from fxllm.backends.cpu import native

    native.available()
    root = tmp_path / "fxllm-cache"
    monkeypatch.setenv("FXLLM_CACHE_DIR", str(root))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # restored at teardown
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.delenv("FXLLM_NO_COMPILE_CACHE", raising=False)
    return root


def _build(*overrides: str) -> LLM:
    return LLM(overrides=[*BASE, *overrides])


def _greedy(llm: LLM) -> list[list[int]]:
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0))
    return [list(o.outputs[0].token_ids) for o in outs]


def _logits(llm: LLM) -> torch.Tensor:
    """The graph's logits for one fixed prefill, through the runner (KV cache and all)."""
    from fxllm.runtime.step_inputs import StepInputs

    runner = llm.engine.runner
    ids = torch.tensor(PROMPTS[0])
    n = len(ids)
    inputs = StepInputs(
        input_ids=ids[None], position_ids=torch.arange(n)[None], slot_mapping=torch.arange(n),
        block_tables=torch.tensor([[0]], dtype=torch.int32), seq_lens=torch.tensor([n], dtype=torch.int32),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32), logits_indices=torch.tensor([n - 1]), sampled=[0],
    )  # fmt: skip
    return runner.execute(inputs)


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in (root / "graphs").iterdir() if p.is_dir() and not p.name.startswith("."))


def test_warm_start_runs_the_cold_start_graph_with_identical_outputs(cache_dir: Path) -> None:
    cold = _build()
    assert cold.build_info.compile_cache.startswith("miss (no entry for model 'tiny-llama' yet)")
    assert len(_entries(cache_dir)) == 1
    warm = _build()
    assert warm.build_info.compile_cache == "hit"
    assert warm.build_info.capture_seconds == 0.0
    # The same code, attributes and decisions: the graph came back whole, not re-captured.
    cold_gm, warm_gm = cold.engine.runner.graph_module, warm.engine.runner.graph_module
    assert warm_gm.code == cold_gm.code
    assert warm.build_info.op_backends == cold.build_info.op_backends
    assert (
        warm.build_info.pass_report.matches("merge_linears")
        == cold.build_info.pass_report.matches("merge_linears")
        > 0
    )
    assert torch.equal(_logits(warm), _logits(cold))
    assert _greedy(warm) == _greedy(cold)
    # No weight is stored: the merged q/k/v and gate/up weights are replayed from the model's.
    manifest = json.loads((_entries(cache_dir)[0] / "manifest.json").read_text())
    assert manifest["stored_bytes"] == 0
    assert manifest["derived_steps"] >= 4


def test_weights_come_from_the_loaded_model(cache_dir: Path) -> None:
    """A hit binds the weights of the model loaded now: another seed's weights give that model's outputs."""
    _build("model.seed=0")
    other_cold_outputs = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FXLLM_NO_COMPILE_CACHE", "1")
        other_cold_outputs = _greedy(_build("model.seed=1"))
    warm_other = _build("model.seed=1")
    assert warm_other.build_info.compile_cache == "hit"
    assert _greedy(warm_other) == other_cold_outputs


def _changed_key(caplog: pytest.LogCaptureFixture, *overrides: str) -> str:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fxllm.compiler.cache_build"):
        llm = _build(*overrides)
    assert llm.build_info.compile_cache.startswith("miss"), llm.build_info.compile_cache
    return llm.build_info.compile_cache


def test_dtype_and_graph_config_changes_miss_and_say_what_changed(
    cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _build()
    assert "dtype float32 -> bfloat16" in _changed_key(caplog, "model.dtype=bfloat16")
    assert "compile.passes changed" in _changed_key(caplog, "compile.passes.fuse_add_rms_norm=false")
    assert "compile.op_backends changed" in _changed_key(caplog, "compile.op_backends.rms_norm=torch")
    assert "model config changed" in _changed_key(caplog, "model.num_layers=1")
    assert "compile.cpu_freezing auto -> off" in _changed_key(caplog, "compile.cpu_freezing=off")
    assert "compile.cpu_cpp_wrapper False -> True" in _changed_key(caplog, "compile.cpu_cpp_wrapper=true")
    assert "quantization changed" in _changed_key(caplog, "quantization.method=fp8")
    assert "compile cache miss" in caplog.text
    assert len(_entries(cache_dir)) == 8
    # Each of them is now a hit; the graph without fuse_add_rms_norm really is another graph.
    unfused = _build("compile.passes.fuse_add_rms_norm=false")
    assert unfused.build_info.compile_cache == "hit"
    assert unfused.build_info.pass_report.matches("fuse_add_rms_norm") == 0
    assert "fused_add_rms_norm" not in str(unfused.build_info.op_backends)


def test_a_changed_pass_source_misses(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _build()
    copy = tmp_path / "passes"
    shutil.copytree(cache_key.SOURCE_DIRS["passes"], copy)
    path = copy / "fuse_add_rms_norm.py"
    path.write_text(path.read_text() + "\n# an edit\n")
    monkeypatch.setitem(cache_key.SOURCE_DIRS, "passes", copy)
    llm = _build()
    assert llm.build_info.compile_cache.startswith("miss")
    assert "source:passes changed" in llm.build_info.compile_cache
    assert "source:ops" not in llm.build_info.compile_cache


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "unpicklable"])
def test_a_bad_entry_is_logged_removed_and_rebuilt(
    cache_dir: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    expected = _greedy(_build())
    entry = _entries(cache_dir)[0]
    payload = entry / "graph.pkl"
    data = payload.read_bytes()
    if damage == "truncate":
        payload.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        payload.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    elif damage == "manifest":
        (entry / "manifest.json").write_text('{"format": 1, "parts": ')
    else:  # a well-formed payload that is not an entry: checksums match, loading fails
        import hashlib
        import pickle

        junk = pickle.dumps({"nodes": "not a graph"})
        payload.write_bytes(junk)
        manifest = json.loads((entry / "manifest.json").read_text())
        manifest.update(payload_bytes=len(junk), payload_sha256=hashlib.sha256(junk).hexdigest())
        (entry / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="fxllm.compiler.cache"):
        rebuilt = _build()
    assert "is unusable" in caplog.text and "removing it and rebuilding" in caplog.text
    assert rebuilt.build_info.compile_cache.startswith("miss")
    assert _greedy(rebuilt) == expected
    assert _build().build_info.compile_cache == "hit"  # and the rebuilt entry serves


def test_the_lock_is_per_key_and_times_out_without_failing(
    cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from filelock import FileLock

    cache = GraphCache(cache_dir)
    cache.graphs.mkdir(parents=True)
    held = FileLock(str(cache.graphs / "k1.lock"))
    held.acquire()
    try:
        with (
            caplog.at_level(logging.WARNING, logger="fxllm.compiler.cache"),
            cache.lock("k1", timeout=0.05) as got,
        ):
            assert got is False
        with cache.lock("k2", timeout=0.05) as got:
            assert got is True
    finally:
        held.release()
    assert "building without it" in caplog.text


# A user pass that derives weights the way pack_linears does on AVX-512 machines (which this one may not
# be): the packed weights must come back by replaying pack_linear_weight on the loaded model's weights.
def _pack_every_linear(gm: GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult()
    for node in list(gm.graph.nodes):
        weight = node.args[1] if is_op(node, torch.ops.aten.linear) else None
        if weight is None or getattr(weight, "op", None) != "get_attr" or arg(node, 2, "bias") is not None:
            continue
        tensor = fetch_attr(gm, str(weight.target))
        name = f"test_packed_{result.num_matches}"
        gm.register_parameter(name, torch.nn.Parameter(pack_linear_weight(tensor), requires_grad=False))
        with gm.graph.inserting_before(node):
            packed = gm.graph.get_attr(name)
            new = gm.graph.call_function(torch.ops.fxllm.packed_linear.default,
                                         (node.args[0], packed, int(tensor.shape[0]), None))  # fmt: skip
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        result.num_matches += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return result


@pytest.fixture
def packing_pass() -> Iterator[str]:
    register_pass("test_pack_every_linear", "finalize")(_pack_every_linear)
    yield "test_pack_every_linear"
    unregister_pass("test_pack_every_linear")


def test_derived_weights_are_replayed_not_stored(cache_dir: Path, packing_pass: str) -> None:
    cold = _build()
    assert cold.build_info.pass_report.matches(packing_pass) > 0
    manifest = json.loads((_entries(cache_dir)[0] / "manifest.json").read_text())
    assert manifest["stored_bytes"] == 0  # merged and then packed: all replayed from the model's weights
    warm = _build()
    assert warm.build_info.compile_cache == "hit"
    packed = [
        n
        for n in warm.engine.runner.graph_module.graph.nodes
        if n.op == "get_attr" and "test_packed" in str(n.target)
    ]
    assert packed
    for node in packed:
        name = str(node.target)
        assert torch.equal(
            fetch_attr(warm.engine.runner.graph_module, name),
            fetch_attr(cold.engine.runner.graph_module, name),
        )
    assert _greedy(warm) == _greedy(cold)


def test_a_pass_without_a_source_file_turns_the_cache_off(cache_dir: Path) -> None:
    namespace: dict[str, object] = {"PassResult": PassResult}
    exec("def nothing(gm, ctx):\n    return PassResult()\n", namespace)  # a pass typed into a REPL
    register_pass("test_no_source", "finalize")(namespace["nothing"])  # type: ignore[arg-type]
    try:
        llm = _build()
    finally:
        unregister_pass("test_no_source")
    assert llm.build_info.compile_cache.startswith("off (passes ['test_no_source']")
    assert not (cache_dir / "graphs").exists()


def test_cache_list_and_clear(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _build()
    _build("model.dtype=bfloat16")
    (cache_dir / "inductor").mkdir(parents=True, exist_ok=True)
    (cache_dir / "inductor" / "x").write_bytes(b"0" * 100)
    assert main(["cache", "list"]) == 0
    listing = capsys.readouterr().out
    assert str(cache_dir) in listing
    assert listing.count("tiny-llama") == 2 and "bfloat16" in listing and "float32" in listing
    assert main(["cache", "clear", "--graphs-only"]) == 0
    assert not (cache_dir / "graphs").exists() and (cache_dir / "inductor" / "x").exists()
    assert main(["cache", "list"]) == 0
    assert "no post-pass graphs" in capsys.readouterr().out
    assert main(["cache", "clear", "--dir", str(cache_dir)]) == 0
    assert not (cache_dir / "inductor").exists()
    assert _build().build_info.compile_cache.startswith("miss")


def test_operator_targets_round_trip() -> None:
    from fxllm.compiler.cache_nodes import decode_callable, encode_callable

    for fn in (operator.getitem, torch.ops.aten.add.Tensor, torch.ops.aten.sym_size.int, torch.cat,
               torch.Tensor.view, torch.nn.functional.pad):  # fmt: skip
        assert decode_callable(encode_callable(fn)) == fn


def test_the_first_key_of_a_process_equals_its_later_ones(tmp_path: Path) -> None:
    """The key reads the op-backend registry, which the device's backends fill on import: a fresh process
    must compute the same key before and after they are imported (its first start used to miss), and
    after another device's backends are imported too (a CPU start after a test that imported the CUDA
    collectives used to compile again instead of loading)."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from fxllm.config import load_config\n"
        "from fxllm.models import load_model\n"
        "from fxllm.compiler.cache_build import start_key\n"
        "config = load_config(None, ['model.model=tiny-llama'])\n"
        "model = load_model('tiny-llama').model\n"
        "args = (config, model, 'tiny-llama', torch.device('cpu'), torch.float32)\n"
        "first = start_key(*args)[0]\n"
        "import fxllm.passes.lower_ops, fxllm.backends.cpu\n"
        "second = start_key(*args)[0]\n"
        "from fxllm.backends.registry import import_device_backends\n"
        "import_device_backends(torch.device('cuda'))\n"
        "print(first == second == start_key(*args)[0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "True", out.stderr[-2000:]


def _user_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def test_a_user_op_backend_is_in_the_key_with_its_priority_and_file() -> None:
    """fxllm's own backends are covered by its source digests; a user's backend is keyed by its name,
    priority and the file that defines it, so a changed user kernel misses."""
    from fxllm.backends.registry import register_op_backend, unregister_op_backend

    before = cache_key.registered_code()[0][1]
    register_op_backend("silu_and_mul", "test_user_silu", _user_silu_and_mul, priority=0)
    try:
        after = cache_key.registered_code()[0][1]
    finally:
        unregister_op_backend("silu_and_mul", "test_user_silu")
    entry = ("test_user_silu", 0, cache_key.digest(Path(__file__).read_bytes()))
    assert entry in after["silu_and_mul"] and entry not in before.get("silu_and_mul", [])
    assert all(name != "triton" for impls in after.values() for name, *_ in impls)
    # fxllm's own function registered by a user is the user's backend: its name and priority pick kernels.
    from fxllm.ops import rms_norm_reference

    register_op_backend("rms_norm", "test_user_reference", rms_norm_reference, priority=7)
    try:
        keyed = cache_key.registered_code()[0][1]["rms_norm"]
    finally:
        unregister_op_backend("rms_norm", "test_user_reference")
    assert [(name, priority) for name, priority, _ in keyed] == [("test_user_reference", 7)]
    # A per-site priority function is keyed by its name and its file.
    register_op_backend("rms_norm", "test_user_per_site", rms_norm_reference, priority=lambda site: 3)
    try:
        (name, priority, _file), *_ = cache_key.registered_code()[0][1]["rms_norm"]
    finally:
        unregister_op_backend("rms_norm", "test_user_per_site")
    assert name == "test_user_per_site" and priority[0].endswith("<locals>.<lambda>")
    assert priority[1] == cache_key.digest(Path(__file__).read_bytes())


def test_cpu_freezing_is_a_config_option_the_graph_carries(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compile.cpu_freezing reaches the graph backend through the graph's meta (no process-wide switch):
    on / off force freezing, auto freezes only where plain linears are left for oneDNN."""
    from fxllm.compiler.backends import FREEZING_META, cpu_freezing
    from fxllm.config import load_config

    assert load_config(None, ["compile.cpu_freezing=off"]).compile.cpu_freezing == "off"
    with pytest.raises(ValueError, match=r"compile\.cpu_freezing"):
        load_config(None, ["compile.cpu_freezing=sometimes"])
    llm = _build("compile.cpu_freezing=on")
    gm = llm.engine.runner.graph_module
    assert gm.meta[FREEZING_META] == "on"
    assert cpu_freezing(gm) == (True, "compile.cpu_freezing=on")
    gm.meta[FREEZING_META] = "off"
    assert cpu_freezing(gm) == (False, "compile.cpu_freezing=off")
    linear = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    linear.graph = torch.fx.Graph()
    x = linear.graph.placeholder("x")
    weight = linear.graph.get_attr("weight")
    linear.graph.output(linear.graph.call_function(torch.ops.aten.linear.default, (x, weight)))
    assert cpu_freezing(linear)[0] is True  # auto: a plain linear is left for oneDNN
    monkeypatch.setenv("FXLLM_CPU_FREEZING", "0")
    with pytest.raises(ValueError, match=r"compile\.cpu_freezing"):
        cpu_freezing(gm)


def test_cpu_cpp_wrapper_is_a_config_option_the_graph_carries(cache_dir: Path) -> None:
    """compile.cpu_cpp_wrapper (off by default) reaches Inductor's settings through the graph's meta."""
    from fxllm.backends.cpu import native
    from fxllm.compiler.backends import CPP_WRAPPER_META, _inductor_settings

    gm = _build().engine.runner.graph_module
    assert gm.meta[CPP_WRAPPER_META] is False
    assert "cpp_wrapper" not in _inductor_settings(gm, torch.device("cpu"))
    gm.meta[CPP_WRAPPER_META] = True
    assert _inductor_settings(gm, torch.device("cpu")).get("cpp_wrapper", False) is native.available()
    assert _build("compile.cpu_cpp_wrapper=true").engine.runner.graph_module.meta[CPP_WRAPPER_META] is True
