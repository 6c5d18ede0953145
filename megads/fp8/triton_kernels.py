"""Triton kernels of the `torch` backend: fused blockwise quantisation (one pass over the
input, padding and expert-segment gathers included) and the grouped per-expert FP8 GEMMs
that torch._scaled_mm has no blockwise grouped form for. Imported only by that backend.

Quantisation matches megads.fp8.quant bit for bit (IEEE division, the same power-of-two
rounding). The GEMMs promote to fp32 after every 128-long slice of the reduction dimension,
as DeepSeek-V3 does (report, 3.3.2): acc += (A_tile . B_tile^T) * scale_a * scale_b.

Grouped layout: the rows of each expert are placed at a 128-aligned offset of a padded row
space (`GroupLayout`), so that every 128-row tile belongs to one expert and the Wgrad
reduction over an expert's tokens runs over whole tiles of that expert only.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from megads.fp8.quant import E4M3, TILE, QTensor, round_up

_MAX = tl.constexpr(448.0)
_EPS = tl.constexpr(1e-12)


@triton.jit
def _scale(amax, POW2: tl.constexpr):
    scale = tl.div_rn(tl.maximum(amax, _EPS), _MAX)
    if POW2:
        scale = ((scale.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def _e4m3(x, scale):
    return tl.clamp(tl.div_rn(x, scale), -_MAX, _MAX).to(tl.float8e4nv)


@triton.jit
def _source_rows(src_ptr, rows, rows_in, HAS_SRC: tl.constexpr):
    """Input row of each output row; -1 for padding."""
    if HAS_SRC:
        return tl.load(src_ptr + rows)
    return tl.where(rows < rows_in, rows, -1)


# ----------------------------------------------------------------------------- quantisation

@triton.jit
def _quant_rows_kernel(x_ptr, src_ptr, q_ptr, s_ptr, rows_in, cols_in, stride_x, q_cols, stride_s_row, stride_s_tile,
                       HAS_SRC: tl.constexpr, POW2: tl.constexpr, BLOCK_R: tl.constexpr):
    """1x128 tiles along the columns: q[r, c] of row src[r]; one program = BLOCK_R rows x 1 tile."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    tile = tl.program_id(1)
    cols = tile * 128 + tl.arange(0, 128)
    src = _source_rows(src_ptr, rows, rows_in, HAS_SRC)
    mask = (src >= 0)[:, None] & (cols < cols_in)[None, :]
    x = tl.load(x_ptr + src.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = _scale(tl.max(tl.abs(x), axis=1), POW2)                           # [BLOCK_R]
    tl.store(q_ptr + rows.to(tl.int64)[:, None] * q_cols + cols[None, :], _e4m3(x, scale[:, None]))
    tl.store(s_ptr + rows * stride_s_row + tile * stride_s_tile, scale)


@triton.jit
def _quant_cols_kernel(x_ptr, src_ptr, q_ptr, s_ptr, rows_in, cols_in, stride_x, q_cols, stride_s_row, stride_s_tile,
                       HAS_SRC: tl.constexpr, POW2: tl.constexpr, BLOCK_C: tl.constexpr):
    """1x128 tiles along the rows, written transposed: q[c, r]; one program = 1 tile x BLOCK_C columns."""
    tile = tl.program_id(0)
    rows = tile * 128 + tl.arange(0, 128)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    src = _source_rows(src_ptr, rows, rows_in, HAS_SRC)
    mask = (src >= 0)[:, None] & (cols < cols_in)[None, :]
    x = tl.load(x_ptr + src.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = _scale(tl.max(tl.abs(x), axis=0), POW2)                           # [BLOCK_C]
    q = _e4m3(x, scale[None, :])                                              # [128, BLOCK_C]
    tl.store(q_ptr + cols.to(tl.int64)[:, None] * q_cols + rows[None, :], tl.trans(q))
    tl.store(s_ptr + cols * stride_s_row + tile * stride_s_tile, scale)


@triton.jit
def _quant_blocks_kernel(w_ptr, q_ptr, s_ptr, rows_in, cols_in, stride_w_e, stride_w_row, q_cols,
                         TRANSPOSE: tl.constexpr, POW2: tl.constexpr):
    """128x128 blocks of w[e]; with TRANSPOSE the blocks of w[e]^T are written instead."""
    br, bc, e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_br, n_bc = tl.num_programs(0), tl.num_programs(1)
    rows = br * 128 + tl.arange(0, 128)
    cols = bc * 128 + tl.arange(0, 128)
    mask = (rows < rows_in)[:, None] & (cols < cols_in)[None, :]
    w = tl.load(w_ptr + e.to(tl.int64) * stride_w_e + rows[:, None] * stride_w_row + cols[None, :],
                mask=mask, other=0.0).to(tl.float32)
    scale = _scale(tl.max(tl.max(tl.abs(w), axis=1), axis=0), POW2)
    q = _e4m3(w, scale)
    q_base = q_ptr + e.to(tl.int64) * (n_br * n_bc * 128 * 128)
    s_base = s_ptr + e * (n_br * n_bc)
    if TRANSPOSE:
        tl.store(q_base + cols.to(tl.int64)[:, None] * q_cols + rows[None, :], tl.trans(q))
        tl.store(s_base + bc * n_br + br, scale)
    else:
        tl.store(q_base + rows.to(tl.int64)[:, None] * q_cols + cols[None, :], q)
        tl.store(s_base + br * n_bc + bc, scale)


def _scale_buffer(rows: int, tiles: int, col_major: bool, device: torch.device) -> torch.Tensor:
    """fp32 [rows, tiles], stored column-major (stride(0) == 1) or row-major."""
    if col_major:
        return torch.empty(tiles, rows, dtype=torch.float32, device=device).t()
    return torch.empty(rows, tiles, dtype=torch.float32, device=device)


def _rows_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def quantize_rows(x: torch.Tensor, power_of_two: bool, rows: int | None = None, src: torch.Tensor | None = None,
                  scale_col_major: bool = True) -> QTensor:
    """x [R, C] -> 1x128 tiles along C: data [rows, Cp], scale [rows, Cp/128].

    rows defaults to round_up(R); with `src` [rows] (int32, -1 = zero row) row r is x[src[r]]."""
    x = _rows_major(x)
    r, c = x.shape
    rows = round_up(r) if rows is None else rows
    cp = round_up(c)
    q = torch.empty(rows, cp, dtype=E4M3, device=x.device)
    s = _scale_buffer(rows, cp // TILE, scale_col_major, x.device)
    if q.numel():
        block_r = 32
        _quant_rows_kernel[(rows // block_r, cp // TILE)](
            x, src if src is not None else x, q, s, r, c, x.stride(0), cp, s.stride(0), s.stride(1),
            HAS_SRC=src is not None, POW2=power_of_two, BLOCK_R=block_r, num_warps=4)
    return QTensor(q, s)


def quantize_cols(x: torch.Tensor, power_of_two: bool, rows: int | None = None, src: torch.Tensor | None = None,
                  scale_col_major: bool = True) -> QTensor:
    """x [R, C] -> x^T in 1x128 tiles along R: data [Cp, rows], scale [Cp, rows/128]. `rows`, `src`
    as for quantize_rows."""
    x = _rows_major(x)
    r, c = x.shape
    rows = round_up(r) if rows is None else rows
    cp = round_up(c)
    q = torch.empty(cp, rows, dtype=E4M3, device=x.device)
    s = _scale_buffer(cp, rows // TILE, scale_col_major, x.device)
    if q.numel():
        block_c = 64
        _quant_cols_kernel[(rows // TILE, cp // block_c)](
            x, src if src is not None else x, q, s, r, c, x.stride(0), rows, s.stride(0), s.stride(1),
            HAS_SRC=src is not None, POW2=power_of_two, BLOCK_C=block_c, num_warps=4)
    return QTensor(q, s)


def quantize_blocks(w: torch.Tensor, power_of_two: bool, transpose: bool = False) -> QTensor:
    """w [N, K] or [E, N, K] -> 128x128 blocks of w (data [.., Np, Kp], scale [.., Np/128, Kp/128])
    or, with `transpose`, of w^T (data [.., Kp, Np], scale [.., Kp/128, Np/128]). Scales row-major."""
    w3 = _rows_major(w if w.dim() == 3 else w.unsqueeze(0))
    e, n, k = w3.shape
    np_, kp = round_up(n), round_up(k)
    shape = (e, kp, np_) if transpose else (e, np_, kp)
    q = torch.empty(shape, dtype=E4M3, device=w.device)
    s = torch.empty(e, shape[1] // TILE, shape[2] // TILE, dtype=torch.float32, device=w.device)
    if q.numel():
        _quant_blocks_kernel[(np_ // TILE, kp // TILE, e)](
            w3, q, s, n, k, w3.stride(0), w3.stride(1), shape[2], TRANSPOSE=transpose, POW2=power_of_two, num_warps=8)
    return QTensor(q, s) if w.dim() == 3 else QTensor(q[0], s[0])


# ----------------------------------------------------------------------------- grouped layout

class GroupLayout(NamedTuple):
    """Experts' rows at 128-aligned offsets of a padded row space of `capacity` rows."""

    row_src: torch.Tensor       # [capacity] int32: sorted input row of each padded row, -1 = padding
    tile_expert: torch.Tensor   # [capacity/128] int32: expert of each 128-row tile, -1 = unused
    tile_start: torch.Tensor    # [E] int32: first tile of each expert
    tile_count: torch.Tensor    # [E] int32: tiles of each expert


def group_layout(counts: torch.Tensor, n: int) -> GroupLayout:
    """From rows per expert (device tensor, sum n); no host synchronisation."""
    e = counts.numel()
    device = counts.device
    capacity = round_up(n + (TILE - 1) * e)             # >= sum_e round_up(counts[e])
    tiles = (counts + TILE - 1) // TILE
    tile_end = tiles.cumsum(0)
    tile_start = tile_end - tiles
    row_start = counts.cumsum(0) - counts
    expert = torch.repeat_interleave(torch.arange(e, device=device), counts, output_size=n)
    dest = tile_start[expert] * TILE + torch.arange(n, device=device) - row_start[expert]
    row_src = torch.full((capacity,), -1, dtype=torch.int32, device=device)
    row_src[dest] = torch.arange(n, dtype=torch.int32, device=device)
    tile_ids = torch.arange(capacity // TILE, device=device)
    tile_expert = torch.searchsorted(tile_end, tile_ids, right=True)
    tile_expert = torch.where(tile_ids < tile_end[-1], tile_expert, -1).to(torch.int32)
    return GroupLayout(row_src, tile_expert, tile_start.to(torch.int32), tiles.to(torch.int32))


# ----------------------------------------------------------------------------- grouped GEMMs

@triton.autotune(configs=[triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=4),
                          triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=4),
                          triton.Config({"BLOCK_N": 256}, num_warps=8, num_stages=3)],
                 key=["NP", "K_TILES"])
@triton.jit
def _grouped_mm_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, out_ptr, tile_expert_ptr, row_dst_ptr,
                       N, NP, K_TILES, stride_sa_row, stride_sa_tile, stride_out, BLOCK_N: tl.constexpr):
    """out[dst[r]] = sum_k (A[r, k-tile] . B[e, :, k-tile]^T) * sa[r, k] * sb[e, n/128, k] for the
    128-row tile of A that belongs to expert e. A [capacity, Kp] 1x128 tiles; B [E, NP, Kp] blocks."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(NP, BLOCK_N)
    tm, tn = pid // n_tiles, pid % n_tiles
    e = tl.load(tile_expert_ptr + tm)
    if e < 0:
        return
    kp = K_TILES * 128
    rows = tm * 128 + tl.arange(0, 128)
    cols = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, 128)
    col_ok = cols < NP
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * kp + ks[None, :]
    b_ptrs = b_ptr + e.to(tl.int64) * NP * kp + cols[:, None] * kp + ks[None, :]
    sa_ptrs = sa_ptr + rows * stride_sa_row
    sb_ptrs = sb_ptr + e * (NP // 128) * K_TILES + (cols // 128) * K_TILES
    acc = tl.zeros((128, BLOCK_N), dtype=tl.float32)
    for kt in range(0, K_TILES):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs, mask=col_ok[:, None], other=0.0)
        sa = tl.load(sa_ptrs + kt * stride_sa_tile)
        sb = tl.load(sb_ptrs + kt, mask=col_ok, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * (sa[:, None] * sb[None, :])
        a_ptrs += 128
        b_ptrs += 128
    dst = tl.load(row_dst_ptr + rows)
    mask = (dst >= 0)[:, None] & (cols < N)[None, :]
    tl.store(out_ptr + dst.to(tl.int64)[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=[triton.Config({"BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=4),
                          triton.Config({"BLOCK_N": 128, "BLOCK_K": 128}, num_warps=4, num_stages=4),
                          triton.Config({"BLOCK_N": 128, "BLOCK_K": 256}, num_warps=8, num_stages=3)],
                 key=["NP", "KP"])
@triton.jit
def _grouped_wgrad_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, out_ptr, tile_start_ptr, tile_count_ptr,
                          N, K, NP, KP, capacity, stride_sa_row, stride_sa_tile, stride_sb_row, stride_sb_tile,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[e] = sum over expert e's token tiles t of (A[:, t] . B[:, t]^T) * sa[:, t] * sb[:, t].
    A = grad^T [NP, capacity], B = x^T [KP, capacity], both 1x128 tiles along tokens; out [E, N, K] fp32."""
    pid, e = tl.program_id(0), tl.program_id(1)
    k_tiles = tl.cdiv(KP, BLOCK_K)
    tn, tk = pid // k_tiles, pid % k_tiles
    rn = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tk * BLOCK_K + tl.arange(0, BLOCK_K)
    t0 = tl.load(tile_start_ptr + e)
    count = tl.load(tile_count_ptr + e)
    ts = t0 * 128 + tl.arange(0, 128)
    a_ptrs = a_ptr + rn.to(tl.int64)[:, None] * capacity + ts[None, :]
    b_ptrs = b_ptr + rk.to(tl.int64)[:, None] * capacity + ts[None, :]
    sa_ptrs = sa_ptr + rn * stride_sa_row + t0 * stride_sa_tile
    sb_ptrs = sb_ptr + rk * stride_sb_row + t0 * stride_sb_tile
    n_ok, k_ok = rn < NP, rk < KP
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for _ in range(0, count):
        a = tl.load(a_ptrs, mask=n_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        sa = tl.load(sa_ptrs, mask=n_ok, other=0.0)
        sb = tl.load(sb_ptrs, mask=k_ok, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * (sa[:, None] * sb[None, :])
        a_ptrs += 128
        b_ptrs += 128
        sa_ptrs += stride_sa_tile
        sb_ptrs += stride_sb_tile
    mask = (rn < N)[:, None] & (rk < K)[None, :]
    tl.store(out_ptr + e.to(tl.int64) * N * K + rn[:, None] * K + rk[None, :], acc, mask=mask)


def grouped_mm(a: QTensor, b: QTensor, layout: GroupLayout, n: int, rows: int, out_dtype: torch.dtype) -> torch.Tensor:
    """a: 1x128 tiles [capacity, Kp] in layout order; b: blocks [E, Np, Kp] -> [rows, n] in input row order."""
    capacity, kp = a.data.shape
    np_ = b.data.shape[1]
    out = torch.empty(rows, n, dtype=out_dtype, device=a.data.device)
    if rows:
        grid = lambda meta: (capacity // TILE * triton.cdiv(np_, meta["BLOCK_N"]),)
        _grouped_mm_kernel[grid](a.data, a.scale, b.data, b.scale, out, layout.tile_expert, layout.row_src,
                                 n, np_, kp // TILE, a.scale.stride(0), a.scale.stride(1), out.stride(0))
    return out


def grouped_wgrad(a: QTensor, b: QTensor, layout: GroupLayout, n: int, k: int) -> torch.Tensor:
    """a = grad^T tiles [Np, capacity], b = x^T tiles [Kp, capacity] -> [E, n, k] fp32."""
    np_, capacity = a.data.shape
    kp = b.data.shape[0]
    experts = layout.tile_count.numel()
    out = torch.empty(experts, n, k, dtype=torch.float32, device=a.data.device)
    grid = lambda meta: (triton.cdiv(np_, meta["BLOCK_N"]) * triton.cdiv(kp, meta["BLOCK_K"]), experts)
    _grouped_wgrad_kernel[grid](a.data, a.scale, b.data, b.scale, out, layout.tile_start, layout.tile_count,
                                n, k, np_, kp, capacity, a.scale.stride(0), a.scale.stride(1),
                                b.scale.stride(0), b.scale.stride(1))
    return out
