r"""The fragment-ordered layout of a 4-bit Linear for the tensor-core kernel (cuda/w4a16_tc.cu), and that kernel's
index maths emulated in plain torch, so that the layout and the partition of the work are tested without a GPU.

Why a layout of its own: `mma.sync.m16n8k16` takes its B operand (16 k x 8 n) as two 32-bit registers per lane,
each a pair of 16-bit numbers at fixed (k, n) positions (PTX ISA, "Matrix fragments for mma.m16n8k16"):

    lane l, g = l // 4, t = l % 4:   b0, b1 = B[2t, g], B[2t+1, g]        b2, b3 = B[2t+8, g], B[2t+9, g]

If every lane finds the nibbles of its own fragment elements in one word, positioned so that one shift and one
mask put two of them into the low bits of the two halves of a register, dequantization happens in registers
straight into B fragments: no shared-memory round trip of dequantized tiles. The order, for a tile of 16 k x
64 n (eight n8 tiles), one 16-byte vector (4 words) per lane:

    word w of lane l holds the n8 tiles 2w and 2w+1; nibble i of the word (bits 4i .. 4i+3) is
        register p = i % 4 of the pair    (p = 0: tile 2w b0b1,  1: tile 2w b2b3,  2: tile 2w+1 b0b1,  3: 2w+1 b2b3)
        element  i // 4 of that register  (0: the low half, 1: the high half)
    so (word >> 4p) & 0x000F000F holds (register p's low nibble, its high nibble) in the two halves:

        bits   31..28 27..24 23..20 19..16 | 15..12 11..8 7..4 3..0
        nibble   7      6      5      4    |    3     2    1    0
                 \-------- high halves -----/  \------ low halves ------/
        k        2t+9   2t+1   2t+9   2t+1     2t+8   2t   2t+8  2t         (+16 x the k step)
        n tile   2w+1   2w+1   2w     2w       2w+1   2w+1 2w    2w        (column 8 x tile + g)

Tensors (N padded to a multiple of 64 with weight 0, scale 0):
    tiles   int32 [N/64, K/16, 32, 4]   tile (c, s) is columns 64c .. 64c+63, rows 16s .. 16s+15 of W^T; a K step of
                                       one column block is 2 KB contiguous per 64 k, so a warp streams along K
    scales  float16 [K/group, N/64, 8, 8]   [q, c, g, j] = s[64c + 8j + g, group q]: lane group g's eight scales
    zeros   uint8 [K/group, N/64, 8, 8]     the same order; unsigned zero points (symmetric: 8)
    weight  W[n, k] = (u - z) * s, computed as ((base + u) - (base + z)) * s in the activation dtype: the
            subtraction is exact, the multiply rounds once (base: 1024 for fp16, 128 for bf16, whose last mantissa
            bit is worth 1, so OR-ing a nibble into it adds the nibble).

Work partition (the kernel's; `emulate` follows it step by step):
    block  = 8 warps: WARPS_N = 2 along n (64 columns each, block n = 128) x WARPS_K = 4 along k
    stage  = WARPS_K chunks of 64 k (256 k), one chunk per warp, 4 k16 steps each; a ring of stages in shared memory
    grid   = (N/128, splits, row passes): split s takes chunks [s*per, (s+1)*per) of K/64; a pass takes 16 x MT rows
    the WARPS_K partial sums of a block are added in shared memory; splits add in float into a workspace
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WARPS_N = 2
WARPS_K = 4
STEPS = 4  # k16 steps per warp per stage
CHUNK_K = 16 * STEPS  # 64
STAGE_K = CHUNK_K * WARPS_K  # 256
TILE_N = 64  # columns per warp
BLOCK_N = TILE_N * WARPS_N  # 128
MAX_MT = 4  # 16-row tiles per row pass (64 rows): 128 accumulator registers per lane


@dataclass
class FragmentW4:
    tiles: torch.Tensor  # int32 [N/64, K/16, 32, 4]
    scales: torch.Tensor  # float16 [K/group, N/64, 8, 8]
    zeros: torch.Tensor  # uint8 [K/group, N/64, 8, 8]
    group: int
    in_features: int
    out_features: int


def nibble_position(lane: torch.Tensor, word: torch.Tensor, nibble: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k within the 16-step, n within the 64 columns) of nibble `nibble` of word `word` of lane `lane`."""
    g, t = lane // 4, lane % 4
    register, element = nibble % 4, nibble // 4
    n_tile = 2 * word + register // 2
    k = 2 * t + 8 * (register % 2) + element
    return k, 8 * n_tile + g


def _lane_word_nibble(device=None):
    ranges = (torch.arange(32, device=device), torch.arange(4, device=device), torch.arange(8, device=device))
    return torch.meshgrid(*ranges, indexing="ij")  # lane, word, nibble: each [32, 4, 8]


def repack_fragments(u: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> FragmentW4:
    """The kernel's layout from unsigned nibbles u uint8 [N, K] (0..15), scales [N, K/group], zeros uint8 [N, K/group]."""
    n_real, k = u.shape
    n = -(-n_real // TILE_N) * TILE_N
    pad = n - n_real
    u = torch.nn.functional.pad(u.to(torch.int64), (0, 0, 0, pad))  # int64: nibble 7 shifted by 28 overflows int32
    scales = torch.nn.functional.pad(scales.to(torch.float16), (0, 0, 0, pad))
    zeros = torch.nn.functional.pad(zeros.to(torch.uint8), (0, 0, 0, pad))
    lane, word, nibble = _lane_word_nibble(u.device)
    kk, nn = nibble_position(lane, word, nibble)
    # blocks[c, s, k16, n64] -> gathered[c, s, lane, word, nibble]
    blocks = u.reshape(n // TILE_N, TILE_N, k // 16, 16).permute(0, 2, 3, 1)
    gathered = blocks[:, :, kk, nn]
    words = (gathered << (4 * nibble)).sum(-1)  # disjoint bits: the sum is the OR
    tiles = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # as int32 bit patterns

    def by_lane_group(v):  # [N, K/group] -> [K/group, N/64, 8 (g), 8 (j)], [q, c, g, j] = v[64c + 8j + g, q]
        return v.T.reshape(v.shape[1], n // TILE_N, 8, 8).transpose(2, 3).contiguous()

    return FragmentW4(tiles.contiguous(), by_lane_group(scales), by_lane_group(zeros), group, k, n_real)


def from_packed(packed) -> FragmentW4:
    """From the kernels' checkpoint-order PackedW4 (llmq.runtime.kernels.cuda): qweight words hold 8 columns each."""
    shifts = torch.arange(0, 32, 4, device=packed.qweight.device, dtype=torch.int32)
    u = ((packed.qweight.unsqueeze(-1) >> shifts) & 0xF).reshape(packed.out_features, packed.in_features)
    return repack_fragments(u.to(torch.uint8), packed.scales, packed.zeros, packed.group)


def lane_registers(words: torch.Tensor) -> torch.Tensor:
    """What the kernel's `(word >> 4p) & 0x000F000F` gives: [..., 4 words] int32 -> [..., 4 words, 4 registers,
    2 halves] nibble values (low half first)."""
    p = torch.arange(4, dtype=torch.int32)
    masked = (words.unsqueeze(-1) >> (4 * p)) & 0x000F000F
    return torch.stack([masked & 0xF, (masked >> 16) & 0xF], dim=-1)


def unpack_fragments(frag: FragmentW4) -> torch.Tensor:
    """u uint8 [N, K] back from the tiles, reading each lane's registers as B fragments (the PTX ISA positions):
    the inverse of repack_fragments if and only if the layout, the bit trick and the fragment map agree."""
    nc, ks = frag.tiles.shape[:2]
    halves = lane_registers(frag.tiles)  # [c, s, lane, word, register, half]
    lane, word, register, half = torch.meshgrid(torch.arange(32), torch.arange(4), torch.arange(4), torch.arange(2),
                                                indexing="ij")
    g, t = lane // 4, lane % 4
    n = 8 * (2 * word + register // 2) + g  # B fragment column: groupID, in n8 tile 2w + p // 2
    k = 2 * t + half + 8 * (register % 2)  # b0b1 (register 0, 2): rows 2t, 2t+1; b2b3: 2t+8, 2t+9
    u = torch.zeros(nc, ks, 16, TILE_N, dtype=torch.int32)
    u[:, :, k, n] = halves
    return u.permute(0, 3, 1, 2).reshape(nc * TILE_N, ks * 16)[: frag.out_features].to(torch.uint8)


# ---- the kernel, emulated ---------------------------------------------------------------------------------------


def _round(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return v.to(dtype).float()


def _fragment_maps():
    """Index maps of the PTX ISA's m16n8k16 fragments, per (lane, register, half): (row, column) of A [16 x 16],
    (k, n) of B [16 x 8], and per (lane, c register) the (row, column) of C [16 x 8]."""
    lane = torch.arange(32)[:, None, None]
    g, t = lane // 4, lane % 4
    reg, half = torch.arange(4)[None, :, None], torch.arange(2)[None, None, :]
    a = (g + 8 * (reg % 2), 2 * t + 8 * (reg // 2) + half)  # reg 0 (row g, k 2t..), 1 (row g+8), 2 (k 2t+8..), 3
    reg2 = torch.arange(2)[None, :, None]
    b = (2 * t + 8 * reg2 + half, g.expand(32, 2, 2))  # reg 0: k 2t, 2t+1; reg 1: k 2t+8, 2t+9; column g
    creg = torch.arange(4)[None, :]
    c = (g[:, :, 0] + 8 * (creg // 2), 2 * t[:, :, 0] + creg % 2)  # c0 c1: row g, cols 2t, 2t+1; c2 c3: row g+8
    return a, b, c


_A_MAP, _B_MAP, _C_MAP = _fragment_maps()


def _a_fragments(a_tile: torch.Tensor, col0: int) -> torch.Tensor:
    """ldmatrix.x4 of a 16 x 16 piece at columns col0..col0+15 of a [16, *] shared tile: lane l gives the address
    of row l % 16, column col0 + 8 (l // 16); matrix j (the addresses of lanes 8j..8j+7) lands in register j, lane l
    receiving row l // 4, columns 2 (l % 4), +1 of it. Returns [32 lanes, 4 registers, 2 halves]."""
    lane = torch.arange(32)
    address_row, address_col = lane % 16, col0 + 8 * (lane // 16)
    matrix = torch.arange(4)[None, :, None]
    source = 8 * matrix + (lane // 4)[:, None, None]  # the lane whose address row lane l reads, per matrix
    return a_tile[address_row[source], address_col[source] + 2 * (lane % 4)[:, None, None] + torch.arange(2)]


def _mma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """mma.m16n8k16 on fragments, J n8 tiles at once: a [32, 4, 2], b [J, 32, 2, 2], c [J, 32, 4] float32 -> d, by
    the PTX ISA's fragment maps (_fragment_maps)."""
    A = torch.zeros(16, 16)
    A[_A_MAP] = a
    B = torch.zeros(b.shape[0], 16, 8)
    B[:, _B_MAP[0], _B_MAP[1]] = b
    return c + (A @ B)[:, _C_MAP[0], _C_MAP[1]]


def emulate(x: torch.Tensor, frag: FragmentW4, bias: torch.Tensor | None, splits: int = 1,
            dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """y = x W^T + b the way cuda/w4a16_tc.cu computes it, lane by lane: the same grid, stages, chunk ownership,
    fragment loads, register dequantization, mma maps, in-block and split-K reductions and edge rules. Rows go
    in passes of 64 (the kernel picks 16, 32 or 64 rows per pass by M; rows never meet, so the sums are the same).
    Slow (Python loops over warps and steps); for small shapes in tests. x [M, K] -> [M, N] in `dtype`."""
    m_rows, k_dim = x.shape
    n_dim = frag.out_features
    xs = _round(x.float(), dtype)
    base = 1024.0 if dtype == torch.float16 else 128.0
    chunks = k_dim // CHUNK_K
    per_split = -(-chunks // splits)
    blocks_n = -(-n_dim // BLOCK_N)
    passes = -(-m_rows // (16 * MAX_MT))
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    workspace = torch.zeros(m_rows, n_dim)
    for bx in range(blocks_n):
        for split in range(splits):
            chunk_begin, chunk_end = split * per_split, min(chunks, (split + 1) * per_split)
            for pass_ in range(passes):
                row0 = pass_ * 16 * MAX_MT
                mt_count = min(MAX_MT, -(-(m_rows - row0) // 16))
                acc = torch.zeros(WARPS_N, WARPS_K, mt_count, 8, 32, 4)
                for stage_chunk in range(chunk_begin, chunk_end, WARPS_K):
                    # the stage's activation tile: rows row0.., columns 64 stage_chunk .. +256; zero past M and K
                    a_tile = torch.zeros(16 * mt_count, STAGE_K)
                    cols = min(STAGE_K, k_dim - CHUNK_K * stage_chunk)
                    rows = min(16 * mt_count, m_rows - row0)
                    a_tile[:rows, :cols] = xs[row0: row0 + rows, CHUNK_K * stage_chunk: CHUNK_K * stage_chunk + cols]
                    for wn in range(WARPS_N):
                        c = bx * WARPS_N + wn
                        if c >= frag.tiles.shape[0]:  # a block's second warp past the padded N: all its loads zero
                            continue
                        for wk in range(WARPS_K):
                            chunk = stage_chunk + wk
                            if chunk >= chunk_end:
                                continue
                            for step in range(STEPS):
                                ks = chunk * STEPS + step
                                q = ks * 16 // frag.group
                                s = _round(frag.scales[q, c, g].float(), dtype)  # [32 lanes, 8 tiles j]
                                z = frag.zeros[q, c, g].float()
                                halves = lane_registers(frag.tiles[c, ks]).float()  # [32, 4 w, 4 p, 2]
                                # n8 tile j = 2w + p // 2: registers p = 0, 1 of word w are tile 2w, p = 2, 3 tile 2w+1
                                regs = halves.reshape(32, 8, 2, 2).transpose(0, 1)  # [8 tiles j, 32, 2 regs, 2]
                                minus = (regs + base) - (base + z.T[:, :, None, None])  # exact
                                b = _round(minus * s.T[:, :, None, None], dtype)
                                for mt in range(mt_count):
                                    a = _a_fragments(a_tile[16 * mt: 16 * mt + 16], wk * CHUNK_K + 16 * step)
                                    acc[wn, wk, mt] = _mma(a, b, acc[wn, wk, mt])
                total = acc.sum(1)  # the in-block reduction over wk (shared memory)
                for wn in range(WARPS_N):
                    for mt in range(mt_count):
                        for j in range(8):
                            for reg in range(4):
                                rows_ = row0 + 16 * mt + g + 8 * (reg // 2)
                                cols_ = bx * BLOCK_N + wn * TILE_N + 8 * j + 2 * t + reg % 2
                                keep = (rows_ < m_rows) & (cols_ < n_dim)
                                workspace[rows_[keep], cols_[keep]] += total[wn, mt, j, keep, reg]
    if bias is not None:
        workspace += bias.float()
    return workspace.to(dtype)
