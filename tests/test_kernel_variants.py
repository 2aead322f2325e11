"""``benchmarks/kernel_variants.py`` builds its variants by editing the library's kernel source: each
variant must still compile (for sm_90, with Triton's bundled compiler: no GPU needed), and differ from
the library where it says it does (an anchor that no longer matches raises instead of silently timing
the library twice)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_variants.py"


@pytest.fixture(scope="module")
def kv():
    spec = importlib.util.spec_from_file_location("kernel_variants", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernel_variants"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["library", "words", "select", "fp32", "chain", "tile", "divide"])
def test_every_variant_compiles(kv, name):
    # "words": the library's kernel with its bf16 pass (WORDS) on.
    module = kv.variant("library" if name == "words" else name)
    fn = kv.pruned(module)
    constexprs = {"NUM_CANDIDATES": 126, "FIRST_DOUBLING": kv.ks.FIRST_DOUBLING, "N_BELOW": kv.ks.N_BELOW,
                  "N_EXTRA": kv.ks.N_EXTRA, "PACKED": True, "WORDS": name == "words", "BLOCK_B": 32}  # fmt: skip
    signature = {k: v for k, v in kv.SIGNATURE.items() if k in fn.arg_names}  # "tile" has no table
    source = ASTSource(fn, signature, {k: v for k, v in constexprs.items() if k in fn.arg_names}, {})
    options = {"num_warps": 2 if name == "tile" else 1, "enable_fp_fusion": False}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    assert len(compiled.asm["cubin"]) > 10_000
    assert ("set.ge.bf16x2.bf16x2" in compiled.asm["ptx"]) == (name == "words")  # the bf16 pass, only there
    if name in ("library", "words"):
        assert module._PAIR_ASM.value == kv.K._PAIR_ASM.value
    if name == "divide":  # session 8's decision sum: one set and one add or FMA per threshold
        assert module._PAIR_ASM.value != kv.K._PAIR_ASM.value
        assert module._PAIR_ASM.value.count("set.") == 7 and "mov.b32 q, 0;" in module._PAIR_ASM.value
    text = Path(module.__file__).read_text()
    if name not in ("library", "words"):
        assert text != kv.SOURCE
