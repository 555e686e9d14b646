"""benchmarks/decode_sass.py: the key loop is found in nvdisasm's text and counted by opcode."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

# benchmarks/ is not a package: load the module from its file.
_SPEC = importlib.util.spec_from_file_location(
    "decode_sass", Path(__file__).resolve().parents[1] / "benchmarks" / "decode_sass.py"
)
assert _SPEC is not None and _SPEC.loader is not None
decode_sass = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(decode_sass)

# The shape of `nvdisasm -c` output: a prologue, a spin loop with no tensor instruction, the key loop (two HGMMA,
# a predicated load, a backward branch), an epilogue.
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
.L_x_0:
        /*0020*/                   NANOSLEEP 0x20 ;
        /*0030*/              @!P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0040*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;
        /*0050*/                   HGMMA.64x16x16.F32 R24, R48, gdesc[UR8], RZ, !UPT ;
        /*0060*/                   HGMMA.64x16x16.F32 R24, R52, gdesc[UR12], R24, gsb0 ;
        /*0070*/               @P1 LDG.E R31, desc[UR20][R24.64] ;
        /*0080*/                   IMAD R3, R3, 0x40, RZ ;
        /*0090*/               @P2 BRA `(.L_x_1) ;
        /*00a0*/                   STG.E [R6.64], R24 ;
        /*00b0*/                   EXIT ;
"""


def test_key_loop_is_the_loop_with_tensor_instructions() -> None:
    body = decode_sass.key_loop(SASS)
    assert [decode_sass.opcode(t) for t in body] == ["LDGSTS", "HGMMA", "HGMMA", "LDG", "IMAD", "BRA"]
    insns, labels = decode_sass.instructions(SASS)
    assert len(insns) == 12 and labels == {".L_x_0": 2, ".L_x_1": 4}


def test_no_tensor_loop_is_an_error() -> None:
    with pytest.raises(ValueError, match="no loop with tensor-core instructions"):
        decode_sass.key_loop(SASS.replace("HGMMA", "FFMA"))
