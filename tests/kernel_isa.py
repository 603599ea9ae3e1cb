"""Tolerances of the CPU kernel sets (kvsnap._ext.isa()) against float64.

The float kernel sets ("generic", "avx2") stay within float32 rounding
(conftest.TOL). The integer sets ("avx512-vnni"; "avx2-int", "avx2-vnni" and, on arm64,
"neon-dotprod" with the same math) take the query-key scores in integers: each
query row is rounded to int8 with one scale per key group (error up to half
a step, max |q_g| / 254, per element), which moves a score by about 0.5% of
its spread; outputs then stay within INT_DOT_TOL of max |reference| on the
tests' random data (worst seen 2.7e-2, an additive mask of N(0, 2) noise
that leaves few keys with most of the weight; 3e-3 to 1e-2 otherwise). Keys
and values of 8 bits get a second int8 plane (about 15 bits; "avx2-int"
rounds those to [-63, 63], about 13 bits, for vpmaddubsw's int16 sums).
tools/check_neon.py holds "neon-dotprod" to INT_DOT_TOL under qemu.
"""

from __future__ import annotations

import pytest
from conftest import TOL
from kvsnap import _ext

INTEGER_DOT_ISAS = frozenset({"avx2-int", "avx2-vnni", "avx512-vnni", "neon-dotprod"})
INT_DOT_TOL = 5e-2


def integer_dot() -> bool:
    """Whether the kernel set in use scores queries against keys in integers."""
    return _ext.isa() in INTEGER_DOT_ISAS


def attention_tol(dtype: str = "float32") -> float:
    """rel_error bound of an attention output in `dtype` for the kernel set in use."""
    return max(TOL[dtype], INT_DOT_TOL) if integer_dot() else TOL[dtype]


def float_isa() -> str:
    """The fastest float kernel set here: the reference other kernels are compared with."""
    available = _ext.available_isas()
    return "avx2" if "avx2" in available else "generic"


@pytest.fixture
def float_kernels():
    """Run a test on the float CPU kernels: for claims of float32-level
    agreement (with mlx-lm reading the same bytes, with the Metal kernels)."""
    before = _ext.isa()
    _ext.set_isa(float_isa())
    yield
    _ext.set_isa(before)
