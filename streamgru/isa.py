"""The product tile fitted to the CPU that Numba compiles for.

The product kernels (``kernels._tile*``) keep a block of outputs in vector registers while one
weight panel streams over k. How big that block may be depends on the vector registers of the
target: a block sized for AVX-512's 32 registers of 64 bytes spills on AVX2's 16 of 32 bytes. This
module asks LLVM what the target Numba compiles for can do and picks the tile from the answer.

The target is Numba's own (``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES``, or the host when unset),
read from the tuple Numba also keys its on-disk cache with (``codegen.magic_tuple()``): a cached
kernel was therefore always built with the tile of the target it was built for, and runs only on
a CPU of that target. Note that ``NUMBA_CPU_NAME`` alone keeps the host's feature list (Numba's
rule): ``NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=""`` builds the AVX2 path on an AVX-512 host.

The configurations (``NV = 2`` vectors per panel row in all of them, so a panel holds
``NR = 2 * vec_bytes / itemsize`` outputs: 32 float32 with 64-byte vectors, 16 with 32, 8 with 16):

========  ====================  =========================================================
name      picked when           tile
========  ====================  =========================================================
avx512    AVX-512F (32 zmm)     rows 6/4/2/1 x 1 panel, k split over 2 accumulator sets
                                (KU=2): up to 24 accumulators of 64 bytes
avx2      32-byte vectors       KU=1; 6 rows x 1 panel (12 accumulators of 16 registers),
          (AVX/AVX2, 16 ymm)    4 x 1, 2 rows x 2 panels, 1 row x 4 panels
vec16     anything else         as avx2 with 16-byte vectors (SSE on x86, NEON on aarch64)
========  ====================  =========================================================

Compact weights (float16, int8) are converted to float32 in registers, in vectors of
``compact_vec_bytes``: the tile's own width, except on AVX-512 CPUs whose 512-bit conversions are
no faster per value than their 256-bit ones (Zen 4, :data:`HALF_RATE_512_CONVERSIONS`). There the
one- and two-row tiles, which convert a weight vector for every one or two multiply-adds, take
each panel row as four 32-byte vectors (16 accumulators at most); the taller tiles, which
convert once per 4 or 6 rows, keep 64-byte vectors.

Few rows get their independent accumulators from several output panels at once, not from
splitting k: every output is then summed in the same order (bias, then k = 0, 1, ...) whichever
tile computes it, so a batch gives bit-identical results to separate calls. The avx512 tile
splits k in every tile alike (KU=2 everywhere), which keeps the same guarantee.

aarch64 (not run by the test suite: no such host) gets vec16: LLVM's NEON FMA on 16-byte
vectors. NEON has 32 registers, so a larger tile (e.g. 8 rows x 1 panel, 16 accumulators) would
fit; vec16's 6 x 1 uses 12 and stays correct and spill-free on every 16-register target too.
A target without fused multiply-add (x86-64 before Haswell) multiplies and adds separately.

``STREAMGRU_TILE={avx512,avx2,vec16}`` forces a tile shape on any target (vector width as named;
the multiply-add follows the target), for tests and comparisons. The generated code then no
longer follows from Numba's cache key, so a forced process compiles every kernel afresh and
neither reads nor writes the on-disk cache (``TileConfig.forced``; see ``kernels._JIT``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

NAMES = ("avx512", "avx2", "vec16")
# AVX-512 CPUs (LLVM names) whose 512-bit float16 and int8 conversions (vcvtph2ps, vpmovsxbd +
# vcvtdq2ps on zmm) convert no more values per cycle than the 256-bit ones: measured on Zen 4,
# where a one-row product over float16 weights ran at 50 GFLOP/s with 64-byte conversions and
# 80 with 32-byte ones (docs/kernels.md, "Weights and compute dtypes"). Other AVX-512 CPUs keep
# 64-byte conversions until measured.
HALF_RATE_512_CONVERSIONS = ("znver4",)
_VEC_BYTES = {"avx512": 64, "avx2": 32, "vec16": 16}
# Vectors per panel row, the same in every configuration.
PANEL_VECTORS = 2


@dataclass(frozen=True)
class TileConfig:
    """The product tile in use.

    Attributes
    ----------
    name : {"avx512", "avx2", "vec16"}
    cpu : str
        The CPU name Numba compiles for.
    vec_bytes : int
        Bytes per vector register the tile uses.
    registers : int
        Vector registers of the target (32 with AVX-512 or on aarch64, else 16).
    fma : bool
        Whether the target has a fused multiply-add (else multiply, then add).
    k_split : int
        Accumulator sets k is split over (KU); 1 means every output is summed in k order.
    rows : tuple of int
        Rows of the tiles, largest first.
    panels : tuple of int
        Output panels each of those tiles computes at once (same order as ``rows``).
    forced : bool
        Chosen by ``STREAMGRU_TILE`` rather than from the target (kernels are then not cached).
    half : bool
        Whether the target converts float16 to float32 in hardware (F16C on x86, every aarch64);
        without it the kernels widen float16 weights with integer operations instead of a
        library call (``kernels._load_weights``).
    compact_vec_bytes : int
        Bytes per vector in which the one- and two-row tiles convert compact weights (float16,
        int8) and multiply them: ``vec_bytes``, or 32 on an AVX-512 CPU whose 512-bit
        conversions convert no more values per cycle than its 256-bit ones
        (:data:`HALF_RATE_512_CONVERSIONS`; and in a forced avx512 tile, so that the suite
        builds it on any host). Those tiles then hold twice as many accumulators, each output
        lane still its own, so the sums are the same bits.
    """

    name: str
    cpu: str
    vec_bytes: int
    registers: int
    fma: bool
    k_split: int
    rows: tuple
    panels: tuple
    forced: bool = False
    half: bool = True
    compact_vec_bytes: int = 0

    def panel_width(self, dtype) -> int:
        """NR: output columns per weight panel for ``dtype`` (the packed layout)."""
        return PANEL_VECTORS * self.vec_bytes // np.dtype(dtype).itemsize

    @property
    def panel_group(self) -> int:
        """Panels a one-row product computes at once: kernels that spread panels over threads
        hand out groups of this many so that each thread's share uses the widest few-row tile."""
        return self.panels[-1]

    def describe(self) -> str:
        """One line for people, e.g. ``avx2 (znver3): 32-byte vectors, 16 registers, FMA,
        tiles 6x1 4x1 2x2 1x4 (rows x panels), NR 16 float32``."""
        tiles = " ".join(f"{r}x{p}" for r, p in zip(self.rows, self.panels))
        ksplit = f", k split in {self.k_split}" if self.k_split > 1 else ""
        compact = (f", compact weights in {self.compact_vec_bytes}-byte vectors"
                   if self.compact_vec_bytes != self.vec_bytes else "")
        return (f"{self.name}{' (forced)' if self.forced else ''} ({self.cpu}): "
                f"{self.vec_bytes}-byte vectors, {self.registers} registers, "
                f"{'FMA' if self.fma else 'no FMA'}, tiles {tiles} (rows x panels){ksplit}, "
                f"NR {self.panel_width('float32')} float32{compact}")

    def as_dict(self) -> dict:
        """The fields as plain JSON-ready values (bench records this with every run)."""
        d = asdict(self)
        d["rows"], d["panels"] = list(self.rows), list(self.panels)
        d["panel_width_float32"] = self.panel_width("float32")
        return d


def make_config(name, cpu, registers, fma, forced=False, half=True) -> TileConfig:
    """The tile of configuration ``name`` (one of :data:`NAMES`) for a target."""
    if name == "avx512":
        compact = 32 if forced or cpu in HALF_RATE_512_CONVERSIONS else 64
        return TileConfig(name, cpu, 64, registers, fma, 2, (6, 4, 2, 1), (1, 1, 1, 1), forced,
                          half, compact)
    return TileConfig(name, cpu, _VEC_BYTES[name], registers, fma, 1, (6, 4, 2, 1),
                      (1, 1, 2, 4), forced, half, _VEC_BYTES[name])


_PROBE = """
target triple = "{triple}"
declare <16 x float> @llvm.fma.v16f32(<16 x float>, <16 x float>, <16 x float>)
define void @probe_add({ptr} %p) #0 {{
  %a = load <16 x float>, {ptr} %p
  %b = fadd <16 x float> %a, %a
  store <16 x float> %b, {ptr} %p
  ret void
}}
define void @probe_fma({ptr} %p) #0 {{
  %a = load <16 x float>, {ptr} %p
  %b = call <16 x float> @llvm.fma.v16f32(<16 x float> %a, <16 x float> %a, <16 x float> %a)
  store <16 x float> %b, {ptr} %p
  ret void
}}
define void @probe_half({ptr} %p, {hptr} %q) #0 {{
  %a = load <8 x half>, {hptr} %q
  %b = fpext <8 x half> %a to <8 x float>
  %c = fadd <8 x float> %b, %b
  %d = shufflevector <8 x float> %c, <8 x float> %c, <16 x i32>
       <i32 0, i32 1, i32 2, i32 3, i32 4, i32 5, i32 6, i32 7,
        i32 0, i32 1, i32 2, i32 3, i32 4, i32 5, i32 6, i32 7>
  store <16 x float> %d, {ptr} %p
  ret void
}}
attributes #0 = {{ "min-legal-vector-width"="512" }}
"""


def numba_target():
    """(triple, cpu name, feature string) Numba compiles for: its cache key for the target."""
    from numba.core.registry import cpu_target

    return cpu_target.target_context.codegen().magic_tuple()


def probe(triple, cpu, features):
    """(vector bytes, has FMA, converts float16 in hardware) of an LLVM target, from the
    assembly LLVM emits for a 64-byte add (the widest registers it uses), a 64-byte fused
    multiply-add (whether it calls libm's ``fmaf`` instead) and a float16 to float32 widening
    (whether it calls a runtime helper, which Numba's JIT cannot resolve). This reads the CPU
    name's defaults as LLVM does when ``features`` is empty, and lets explicit features
    override them. A target LLVM cannot compile for here gives (16, False, False): the vec16
    tile with separate multiply and add, and integer float16 widening, are correct
    everywhere."""
    import llvmlite.binding as ll

    try:
        if triple != ll.get_process_triple():  # Numba initialises only the host's target
            ll.initialize_all_targets()
            ll.initialize_all_asmprinters()
        try:
            module = ll.parse_assembly(_PROBE.format(triple=triple, ptr="ptr", hptr="ptr"))
        except RuntimeError:  # LLVM before opaque pointers (llvmlite < 0.44)
            module = ll.parse_assembly(_PROBE.format(triple=triple, ptr="<16 x float>*",
                                                     hptr="<8 x half>*"))
        tm = ll.Target.from_triple(triple).create_target_machine(cpu=cpu, features=features,
                                                                 opt=2)
        asm = tm.emit_assembly(module)
    except RuntimeError:
        return 16, False, False
    add, _, rest = asm.partition("probe_fma:")
    fma, _, half = rest.partition("probe_half:")
    if triple.startswith(("x86_64", "i386", "i686")):
        vec = 64 if "zmm" in add else 32 if "ymm" in add else 16
    else:
        vec = 16
    return vec, "fmaf" not in fma, not any(c in half for c in ("extendhf", "h2f", "call", "jmp\t_"))


def select(target=None, forced=None) -> TileConfig:
    """The tile for ``target`` (default: Numba's, see :func:`numba_target`); ``forced`` (default:
    ``$STREAMGRU_TILE``) names a configuration to use whatever the target.

    Examples
    --------
    >>> select(("x86_64-unknown-linux-gnu", "haswell", ""), forced="").name
    'avx2'
    >>> select(("x86_64-unknown-linux-gnu", "skylake-avx512", ""), forced="").k_split
    2
    """
    triple, cpu, features = target if target is not None else numba_target()
    if forced is None:
        forced = os.environ.get("STREAMGRU_TILE", "")
    vec, fma, half = probe(triple, cpu, features)
    x86 = triple.startswith(("x86_64", "i386", "i686"))
    registers = 32 if (vec == 64 or not x86) else 16
    if forced:
        if forced not in NAMES:
            raise ValueError(f"STREAMGRU_TILE: expected one of {', '.join(NAMES)}, got "
                             f"{forced!r}; unset it to follow the target")
        return make_config(forced, cpu, registers, fma, forced=True, half=half)
    name = "avx512" if vec == 64 else "avx2" if vec == 32 else "vec16"
    return make_config(name, cpu, registers, fma, half=half)


TILE = select()
"""The configuration of this process, fixed at import (the kernels are compiled for it)."""
