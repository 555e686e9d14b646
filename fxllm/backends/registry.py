"""Op backends: the implementations of each canonical op, and the per-node choice among them.

Every canonical op (fxllm/ops/registry.py) has its plain-torch reference, named "torch". Faster
implementations register here, each as an op of its own namespace (`fxllm_triton::rms_norm`,
`fxllm_cpu::packed_linear`, ...), with a capability check and a priority. Nothing here installs a
kernel on the canonical ops: the lowering pass rewrites each graph node to the target of the
implementation `choose_implementation` picks for it, so two graphs in one process can run
different kernels for the same op.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

REFERENCE = "torch"


@dataclass(frozen=True)
class OpSite:
    """What a capability check sees of one op node: the device and the fake values of its arguments."""

    op: str
    device: torch.device
    args: tuple[Any, ...] = ()  # every schema argument in order; tensors as fake tensors (or None)

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The tensor arguments, in order."""
        return [a for a in self.args if isinstance(a, torch.Tensor)]

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype of the first tensor argument."""
        tensors = self.tensors
        return tensors[0].dtype if tensors else None


Supports = Callable[[OpSite], bool]
Priority = int | Callable[[OpSite], int]  # a constant, or per node (e.g. by the weight's shape)


@dataclass
class OpImplementation:
    """One non-reference implementation of a canonical op."""

    op: str  # canonical op name, e.g. "rms_norm"
    name: str  # backend name, e.g. "triton"
    load_target: Callable[[], torch._ops.OpOverload | None]  # None: unavailable here (e.g. did not build)
    supports: Supports
    # Higher wins when the config does not choose; <= 0: only where the config names it.
    priority: Priority = 0
    code: object = None  # the registered fn or target: where a user's kernel is defined (compile cache key)
    builtin: bool = False  # registered by fxllm's own backends (their code is in the key's source digests)
    _target: list[torch._ops.OpOverload | None] = field(default_factory=list, repr=False)

    def defining_code(self) -> object:
        """The function (or op) registered, out of any functools.partial around it."""
        code = self.code
        while isinstance(code, functools.partial):
            code = code.func
        return code

    def priority_at(self, site: OpSite) -> int:
        """This implementation's priority for `site`."""
        return self.priority if isinstance(self.priority, int) else self.priority(site)

    def target(self) -> torch._ops.OpOverload | None:
        """The op that lowered nodes call (loaded once)."""
        if not self._target:
            self._target.append(self.load_target())
        return self._target[0]


_IMPLS: dict[str, dict[str, OpImplementation]] = {}
_LIBRARIES: dict[str, torch.library.Library] = {}  # per backend namespace, kept alive


def _canonical_schema(op: str) -> str:
    from fxllm.ops.registry import canonical_ops

    if op not in canonical_ops():
        raise ValueError(f"unknown op fxllm::{op}; canonical ops: {sorted(canonical_ops())}")
    return str(getattr(torch.ops.fxllm, op).default._schema).split("::", 1)[1]


def define_backend_op(op: str, backend: str, fn: Callable[..., object]) -> torch._ops.OpOverload:
    """Define `fxllm_<backend>::<op>` with the canonical op's schema, running `fn`, with the canonical fake."""
    namespace = f"fxllm_{backend}"
    lib = _LIBRARIES.get(namespace)
    if lib is None:
        lib = _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
    lib.define(_canonical_schema(op))
    lib.impl(op, fn, "CompositeExplicitAutograd")
    canonical = getattr(torch.ops.fxllm, op).default
    # Shapes, dtypes and strides are the canonical op's: its fake implementation answers for both.
    torch.library.register_fake(
        f"{namespace}::{op}", lambda *args, **kwargs: canonical(*args, **kwargs), lib=lib
    )
    return getattr(getattr(torch.ops, namespace), op).default


def register_op_backend(
    op: str,
    name: str,
    fn: Callable[..., object] | None = None,
    *,
    target: torch._ops.OpOverload | Callable[[], torch._ops.OpOverload | None] | None = None,
    supports: Supports | None = None,
    priority: Priority = 0,
    _builtin: bool = False,
) -> None:
    """Register backend `name` of canonical op `op`: a Python `fn` with the op's signature (defined as
    `fxllm_<name>::<op>`), or an existing op `target` (or a loader returning one, None if unavailable).

    The lowering picks it for nodes it `supports` when its priority beats the reference's (0) and
    every other supporting backend's; with priority <= 0 it runs only where compile.op_backends names it.
    `priority` may be a function of the site: a backend that is the default for some nodes only.
    (`_builtin`: fxllm's own backends, left out of the compile cache key, which digests their sources.)
    """
    if name == REFERENCE:
        raise ValueError(f"backend name {REFERENCE!r} is the built-in reference; pick another name")
    if (fn is None) == (target is None):
        raise ValueError("register_op_backend takes exactly one of fn (a Python kernel) or target (an op)")
    _canonical_schema(op)  # fails early with the known ops
    if name in _IMPLS.get(op, {}):
        raise ValueError(f"op {op}: a backend named {name!r} is already registered")
    if fn is not None:
        overload = define_backend_op(op, name, fn)
        loader: Callable[[], torch._ops.OpOverload | None] = lambda: overload  # noqa: E731
    elif isinstance(target, torch._ops.OpOverload):
        loader = functools.partial(lambda t: t, target)
    else:
        loader = target  # type: ignore[assignment]
    _IMPLS.setdefault(op, {})[name] = OpImplementation(
        op,
        name,
        loader,
        supports or (lambda _site: True),
        priority,
        fn if fn is not None else target,
        _builtin,
    )


def unregister_op_backend(op: str, name: str) -> None:
    """Forget backend `name` of `op` (graphs lowered to it keep calling its op)."""
    _IMPLS.get(op, {}).pop(name, None)


def op_backends(op: str) -> list[str]:
    """Names of every backend of `op`, the reference first."""
    return [REFERENCE, *sorted(_IMPLS.get(op, {}))]


def implementation(op: str, name: str) -> OpImplementation:
    """The registered implementation `name` of `op` (not the reference)."""
    return _IMPLS[op][name]


@dataclass(frozen=True)
class Choice:
    """The implementation chosen for one node, and why."""

    backend: str
    reason: str  # "preference", "priority", "only choice", "fallback: ..."
    fallback: bool = False  # a faster implementation exists for this site but could not be used


def choose_implementation(site: OpSite, preference: str | None = None) -> Choice:
    """Pick the implementation of `site.op` for this node: the configured one (which must support the
    site), else the highest-priority one that supports it and loads, else the reference."""
    impls = _IMPLS.get(site.op, {})
    if preference == REFERENCE:
        return Choice(REFERENCE, "preference (compile.op_backends)")
    if preference is not None:
        impl = impls.get(preference)
        if impl is None:
            raise ValueError(
                f"compile.op_backends: op {site.op} has no backend {preference!r}; available: {op_backends(site.op)}"
            )
        if not impl.supports(site):
            raise ValueError(
                f"compile.op_backends: backend {preference!r} of op {site.op} does not support "
                f"{site.device} / {site.dtype}; choose one of {op_backends(site.op)}"
            )
        if impl.target() is None:
            raise RuntimeError(f"compile.op_backends: backend {preference!r} of op {site.op} failed to load "
                               "(see the log above); choose another backend")  # fmt: skip
        return Choice(preference, "preference (compile.op_backends)")
    unavailable: list[str] = []
    ranked = sorted(((impl.priority_at(site), impl) for impl in impls.values()), key=lambda pi: -pi[0])
    for priority, impl in ranked:
        if priority <= 0 or not impl.supports(site):  # the reference's priority is 0
            continue
        if impl.target() is None:
            unavailable.append(impl.name)
            continue
        return Choice(impl.name, f"priority {priority} on {site.device.type}")
    if unavailable:
        return Choice(REFERENCE, f"fallback: {', '.join(unavailable)} failed to load", fallback=True)
    return Choice(REFERENCE, f"no other backend supports {site.device.type} / {site.dtype}")


def import_device_backends(device: torch.device) -> None:
    """Import the built-in backends for `device`'s type (each registers its implementations once)."""
    import fxllm.ops  # noqa: F401  (the canonical ops exist before backends register for them)

    if device.type == "cpu":
        from fxllm.backends import cpu  # noqa: F401
    elif device.type == "cuda":
        from fxllm.backends import cuda_all_gather, cuda_collectives, triton  # noqa: F401

        with contextlib.suppress(ImportError):  # without triton the unfused symm_mem backend serves the op
            from fxllm.backends.triton import allreduce_norm  # noqa: F401
        from fxllm.backends import cuda_lamport  # noqa: F401  (imports triton only when it runs)


def check_preferences(preferences: Mapping[str, str]) -> None:
    """Fail on unknown op names or backend names in compile.op_backends, naming what exists."""
    from fxllm.ops.registry import canonical_ops

    known = canonical_ops()
    for op, backend in preferences.items():
        if op not in known:
            raise ValueError(f"compile.op_backends: unknown op {op!r}; known ops: {sorted(known)}")
        if backend not in op_backends(op):
            raise ValueError(
                f"compile.op_backends.{op}: unknown backend {backend!r}; available: {op_backends(op)}"
            )
