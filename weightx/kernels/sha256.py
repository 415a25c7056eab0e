"""SHA-256 with hashlib's digests, at the speed the hash of a 7B merge's 40 GB needs.

Two things cost a first run most of its provenance time on a server core, and neither is the
hash's arithmetic: (1) sha256 fed straight from DRAM or from another core's cache stalls on every
load (0.7-1.1 GB/s against 1.7 from L2 on an AVX-512 VM), while a copy streams at ~9 GB/s; so
`update` copies large buffers through a 256 KB buffer that stays in this core's L2 and hashes it
there. (2) One stream's SHA-NI rounds are a chain that waits on itself: two independent files
hashed in one loop (`update_pair`) fill the gaps, 1.75 → 2.28 GB/s a core on that VM.

The rounds are SHA-NI (`sha256rnds2`, `sha256msg1/2`) emitted as LLVM IR, compiled once a process
by llvmlite (numba's own compiler, a declared dependency) for this CPU, and called through ctypes,
which releases the GIL. Where the CPU has no SHA extensions, llvmlite is missing, or
WEIGHTX_SHA_NI=0, the same class runs on hashlib (still staged), so digests never depend on the
path; tests compare both with hashlib on every tail length.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import struct
import threading

import numpy as np

STAGE = 256 << 10  # the L2 staging buffer; whole 64-byte blocks
# Below this many bytes expected, hashlib (staged) does the work: compiling the kernel costs ~60 ms
# and ~7 MB once a process, more than it saves on a config file or a test's tiny shard.
NATIVE_MIN = 64 << 20
_BLOCK = 64
_IV = (0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19)
_K = (
    0x428A2F98, 0x71374491, 0xB5C0FBCF, 0xE9B5DBA5, 0x3956C25B, 0x59F111F1, 0x923F82A4, 0xAB1C5ED5,
    0xD807AA98, 0x12835B01, 0x243185BE, 0x550C7DC3, 0x72BE5D74, 0x80DEB1FE, 0x9BDC06A7, 0xC19BF174,
    0xE49B69C1, 0xEFBE4786, 0x0FC19DC6, 0x240CA1CC, 0x2DE92C6F, 0x4A7484AA, 0x5CB0A9DC, 0x76F988DA,
    0x983E5152, 0xA831C66D, 0xB00327C8, 0xBF597FC7, 0xC6E00BF3, 0xD5A79147, 0x06CA6351, 0x14292967,
    0x27B70A85, 0x2E1B2138, 0x4D2C6DFC, 0x53380D13, 0x650A7354, 0x766A0ABB, 0x81C2C92E, 0x92722C85,
    0xA2BFE8A1, 0xA81A664B, 0xC24B8B70, 0xC76C51A3, 0xD192E819, 0xD6990624, 0xF40E3585, 0x106AA070,
    0x19A4C116, 0x1E376C08, 0x2748774C, 0x34B0BCB5, 0x391C0CB3, 0x4ED8AA4A, 0x5B9CCA4F, 0x682E6FF3,
    0x748F82EE, 0x78A5636F, 0x84C87814, 0x8CC70208, 0x90BEFFFA, 0xA4506CEB, 0xBEF9A3F7, 0xC67178F2,
)


def _ir(ways: int) -> str:
    """`void sha256_x{ways}(ptr state0, ptr data0, ..., i64 blocks)`: `blocks` 64-byte blocks of each
    stream. A state is 8 uint32 in SHA-NI's lane order [F, E, B, A, H, G, D, C] (`_to_lanes`). The
    round structure is Intel's (white paper "Intel SHA Extensions", 2013): per 4 rounds, msg + K into
    two `sha256rnds2`, with `sha256msg1/2` extending the schedule 4 words at a time."""
    out: list[str] = []
    e = out.append
    e(f"define void @sha256_x{ways}({', '.join(f'ptr %st{w}, ptr %d{w}' for w in range(ways))}, i64 %n) {{")
    e("entry:")
    for w in range(ways):
        e(f"  %st{w}h = getelementptr i8, ptr %st{w}, i64 16")
        e(f"  %abef{w} = load <4 x i32>, ptr %st{w}, align 4")
        e(f"  %cdgh{w} = load <4 x i32>, ptr %st{w}h, align 4")
    e("  %none = icmp eq i64 %n, 0")
    e("  br i1 %none, label %done, label %loop")
    e("loop:")
    e("  %i = phi i64 [0, %entry], [%i1, %loop]")
    for w in range(ways):
        e(f"  %a{w} = phi <4 x i32> [%abef{w}, %entry], [%a{w}n, %loop]")
        e(f"  %c{w} = phi <4 x i32> [%cdgh{w}, %entry], [%c{w}n, %loop]")
    e("  %off = shl i64 %i, 6")
    names = iter(range(1 << 30))

    def v() -> str:
        return f"%v{next(names)}"

    msg = [[""] * 16 for _ in range(ways)]  # message schedule, 4 words per group
    s0 = [f"%a{w}" for w in range(ways)]
    s1 = [f"%c{w}" for w in range(ways)]
    for g in range(16):  # rounds 4g .. 4g+3; the streams' instructions interleave group by group
        for w in range(ways):
            if g < 4:
                p, raw, m = v(), v(), v()
                e(f"  {p} = getelementptr i8, ptr %d{w}, i64 %off")
                q = v()
                e(f"  {q} = getelementptr i8, ptr {p}, i64 {16 * g}")
                e(f"  {raw} = load <4 x i32>, ptr {q}, align 1")
                e(f"  {m} = call <4 x i32> @llvm.bswap.v4i32(<4 x i32> {raw})")  # big-endian words
                msg[w][g] = m
            k = ", ".join(f"i32 {x - (1 << 32) if x >= 1 << 31 else x}" for x in _K[4 * g:4 * g + 4])
            wk, hi, r1, r0 = v(), v(), v(), v()
            e(f"  {wk} = add <4 x i32> {msg[w][g]}, <{k}>")
            e(f"  {r1} = call <4 x i32> @llvm.x86.sha256rnds2(<4 x i32> {s1[w]}, <4 x i32> {s0[w]}, <4 x i32> {wk})")
            s1[w] = r1
            if 3 <= g <= 14:  # finish words 4(g+1) .. 4(g+1)+3
                al, ad, m2 = v(), v(), v()
                e(f"  {al} = shufflevector <4 x i32> {msg[w][g - 1]}, <4 x i32> {msg[w][g]}, <4 x i32> <i32 1, i32 2, i32 3, i32 4>")
                e(f"  {ad} = add <4 x i32> {msg[w][g + 1]}, {al}")
                e(f"  {m2} = call <4 x i32> @llvm.x86.sha256msg2(<4 x i32> {ad}, <4 x i32> {msg[w][g]})")
                msg[w][g + 1] = m2
            e(f"  {hi} = shufflevector <4 x i32> {wk}, <4 x i32> poison, <4 x i32> <i32 2, i32 3, i32 0, i32 0>")
            e(f"  {r0} = call <4 x i32> @llvm.x86.sha256rnds2(<4 x i32> {s0[w]}, <4 x i32> {s1[w]}, <4 x i32> {hi})")
            s0[w] = r0
            if 1 <= g <= 12:  # start words 4(g+3) .. 4(g+3)+3
                m1 = v()
                e(f"  {m1} = call <4 x i32> @llvm.x86.sha256msg1(<4 x i32> {msg[w][g - 1]}, <4 x i32> {msg[w][g]})")
                msg[w][g + 3] = m1
    for w in range(ways):
        e(f"  %a{w}n = add <4 x i32> {s0[w]}, %a{w}")
        e(f"  %c{w}n = add <4 x i32> {s1[w]}, %c{w}")
    e("  %i1 = add i64 %i, 1")
    e("  %more = icmp ult i64 %i1, %n")
    e("  br i1 %more, label %loop, label %exit")
    e("exit:")
    for w in range(ways):
        e(f"  store <4 x i32> %a{w}n, ptr %st{w}, align 4")
        e(f"  store <4 x i32> %c{w}n, ptr %st{w}h, align 4")
    e("  br label %done")
    e("done:")
    e("  ret void")
    e("}")
    return "\n".join(out)


_DECLARE = """declare <4 x i32> @llvm.x86.sha256rnds2(<4 x i32>, <4 x i32>, <4 x i32>)
declare <4 x i32> @llvm.x86.sha256msg1(<4 x i32>, <4 x i32>)
declare <4 x i32> @llvm.x86.sha256msg2(<4 x i32>, <4 x i32>)
declare <4 x i32> @llvm.bswap.v4i32(<4 x i32>)
"""

_compile_lock = threading.Lock()


@functools.cache
def _native():
    """(x1, x2) ctypes functions, or None where SHA-NI can't run here."""
    if os.environ.get("WEIGHTX_SHA_NI", "").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        import llvmlite.binding as llvm
    except ImportError:
        return None
    with _compile_lock:
        try:
            features = llvm.get_host_cpu_features()
            if not (features.get("sha") and features.get("ssse3")):
                return None
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            module = llvm.parse_assembly(_DECLARE + _ir(1) + "\n" + _ir(2))
            module.verify()
            machine = llvm.Target.from_default_triple().create_target_machine(
                cpu=llvm.get_host_cpu_name(), features=features.flatten(), opt=2)
            engine = llvm.create_mcjit_compiler(module, machine)
            engine.finalize_object()
        except Exception:  # an llvmlite without these intrinsics, a locked-down JIT: use hashlib
            return None
        ptr = ctypes.c_void_p
        x1 = ctypes.CFUNCTYPE(None, ptr, ptr, ctypes.c_int64)(engine.get_function_address("sha256_x1"))
        x2 = ctypes.CFUNCTYPE(None, ptr, ptr, ptr, ptr, ctypes.c_int64)(engine.get_function_address("sha256_x2"))
        _native.engine = engine  # the code lives as long as the engine
        return x1, x2


def native() -> bool:
    """Whether this process hashes with the SHA-NI kernel (else hashlib, with the same digests)."""
    return _native() is not None


def _to_lanes(h) -> np.ndarray:
    a, b, c, d, e, f, g, hh = h
    return np.array([f, e, b, a, hh, g, d, c], dtype=np.uint32)


def _address(view: memoryview) -> int:
    """The address of a C-contiguous buffer (read-only ones too: the kernel only reads)."""
    return np.frombuffer(view, dtype=np.uint8).ctypes.data


class Sha256:
    """`hashlib.sha256` for bulk data: update / digest / hexdigest, the same bytes out.

    Buffers up to STAGE are hashed where they are (a caller's pread buffer is already in L2);
    larger ones are copied through a private L2-sized buffer first (module docstring). One instance
    is used by one thread at a time (its caller's lock or thread)."""

    def __init__(self, data: bytes | memoryview = b"", expected: int | None = None):
        """`expected`: about how many bytes will be hashed (None: unknown, large)."""
        self._kernels = _native() if expected is None or expected >= NATIVE_MIN else None
        self._h = None if self._kernels else hashlib.sha256()
        self._state = _to_lanes(_IV)
        self._tail = b""  # < 64 bytes not yet in a block (native path)
        self._length = 0
        self._stage: np.ndarray | None = None
        if len(data):
            self.update(data)

    # -- feeding ------------------------------------------------------------------------------
    def _staged(self, view: memoryview):
        """Yield pieces of `view` (bytes) that sit in L2: small ones as they are, large ones copied."""
        if view.nbytes <= STAGE:
            yield view
            return
        if self._stage is None:
            self._stage = np.empty(STAGE, dtype=np.uint8)
        stage = memoryview(self._stage)
        src = _address(view)
        for i in range(0, view.nbytes, STAGE):
            n = min(STAGE, view.nbytes - i)
            ctypes.memmove(self._stage.ctypes.data, src + i, n)  # a foreign call: no GIL held
            yield stage[:n]

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        if self._h is not None:
            for piece in self._staged(view):
                self._h.update(piece)  # releases the GIL
            return
        self._length += view.nbytes
        if self._tail:
            take = min(_BLOCK - len(self._tail), view.nbytes)
            self._tail += bytes(view[:take])
            view = view[take:]
            if len(self._tail) < _BLOCK:
                return
            self._blocks(memoryview(self._tail))
            self._tail = b""
        whole = view.nbytes - view.nbytes % _BLOCK
        for piece in self._staged(view[:whole]):
            self._blocks(piece)
        self._tail = bytes(view[whole:])

    def _blocks(self, piece: memoryview) -> None:
        self._kernels[0](self._state.ctypes.data, _address(piece), piece.nbytes // _BLOCK)

    # -- result -------------------------------------------------------------------------------
    def digest(self) -> bytes:
        if self._h is not None:
            return self._h.digest()
        state = self._state.copy()
        tail = self._tail + b"\x80" + b"\0" * ((55 - len(self._tail)) % _BLOCK) + struct.pack(">Q", 8 * self._length)
        buf = np.frombuffer(tail, dtype=np.uint8)
        self._kernels[0](state.ctypes.data, buf.ctypes.data, len(tail) // _BLOCK)
        f, e, b, a, h, g, d, c = (int(x) for x in state)
        return struct.pack(">8I", a, b, c, d, e, f, g, h)

    def hexdigest(self) -> str:
        return self.digest().hex()


def update_pair(x: Sha256, a: memoryview, y: Sha256, b: memoryview) -> None:
    """`x.update(a); y.update(b)`, the whole blocks both have hashed in one interleaved loop.

    For two L2-resident buffers (a pread buffer each); where the kernel is not native this is just
    the two updates."""
    a, b = memoryview(a).cast("B"), memoryview(b).cast("B")
    if x._h is not None or y._h is not None or x._tail or y._tail or x is y:
        x.update(a)
        y.update(b)
        return
    both = min(a.nbytes, b.nbytes) // _BLOCK * _BLOCK
    if both:
        x._kernels[1](x._state.ctypes.data, _address(a), y._state.ctypes.data, _address(b), both // _BLOCK)
        x._length += both
        y._length += both
    x.update(a[both:])
    y.update(b[both:])
