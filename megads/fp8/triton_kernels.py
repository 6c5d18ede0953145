"""Triton kernels of the `torch` backend: fused blockwise quantisation (one pass over the
input, padding and expert-segment gathers included) and the grouped per-expert FP8 GEMMs
that torch._scaled_mm has no blockwise grouped form for. Imported only by that backend.

Quantisation matches megads.fp8.quant bit for bit (the same scale arithmetic, IEEE division
x / scale). The GEMMs promote to fp32 after every 128-long slice of the reduction dimension,
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
_INV_MAX = tl.constexpr(1.0 / 448.0)
_EPS = tl.constexpr(1e-12)


@triton.jit
def _scale(amax, POW2: tl.constexpr):
    scale = tl.maximum(amax, _EPS) * _INV_MAX
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
def _quant_act_kernel(x_ptr, src_ptr, qr_ptr, sr_ptr, qc_ptr, sc_ptr, rows_in, cols_in, stride_x, rows_out, cols_out,
                      HAS_SRC: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, POW2: tl.constexpr):
    """One 128x128 block of the gathered, zero-padded input [rows_out, cols_out], read once.
    ROWS: 1x128 tiles along the columns -> qr [rows_out, cols_out], sr [rows_out, cols_out/128];
    COLS: 1x128 tiles along the rows, transposed -> qc [cols_out, rows_out], sc [cols_out, rows_out/128].
    Scales are stored column-major."""
    bt, bc = tl.program_id(0), tl.program_id(1)
    rows = bt * 128 + tl.arange(0, 128)
    cols = bc * 128 + tl.arange(0, 128)
    src = _source_rows(src_ptr, rows, rows_in, HAS_SRC)
    mask = (src >= 0)[:, None] & (cols < cols_in)[None, :]
    x = tl.load(x_ptr + src.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if ROWS:
        scale = _scale(tl.max(tl.abs(x), axis=1), POW2)                       # [128], one per row
        tl.store(qr_ptr + rows.to(tl.int64)[:, None] * cols_out + cols[None, :], _e4m3(x, scale[:, None]))
        tl.store(sr_ptr + bc * rows_out + rows, scale)
    if COLS:
        scale = _scale(tl.max(tl.abs(x), axis=0), POW2)                       # [128], one per column
        q = tl.trans(_e4m3(x, scale[None, :]))
        tl.store(qc_ptr + cols.to(tl.int64)[:, None] * rows_out + rows[None, :], q)
        tl.store(sc_ptr + bt * cols_out + cols, scale)


@triton.jit
def _quant_weight_kernel(w_ptr, q_ptr, s_ptr, rows_in, cols_in, stride_w_e, stride_w_row, POW2: tl.constexpr):
    """One 128x128 block of w[e] -> its e4m3 values in q [E, Rp, Cp] and its scale in s [E, Rp/128, Cp/128]."""
    br, bc, e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_br, n_bc = tl.num_programs(0), tl.num_programs(1)
    rows = br * 128 + tl.arange(0, 128)
    cols = bc * 128 + tl.arange(0, 128)
    mask = (rows < rows_in)[:, None] & (cols < cols_in)[None, :]
    w = tl.load(w_ptr + e.to(tl.int64) * stride_w_e + rows[:, None] * stride_w_row + cols[None, :],
                mask=mask, other=0.0).to(tl.float32)
    scale = _scale(tl.max(tl.max(tl.abs(w), axis=1), axis=0), POW2)
    offset = e.to(tl.int64) * (n_br * n_bc * 128 * 128)
    tl.store(q_ptr + offset + rows.to(tl.int64)[:, None] * (n_bc * 128) + cols[None, :], _e4m3(w, scale))
    tl.store(s_ptr + e * (n_br * n_bc) + br * n_bc + bc, scale)


def _tiles(rows: int, cols: int, device: torch.device) -> QTensor:
    """Empty 1x128-tile QTensor [rows, cols] with column-major scales [rows, cols/128]."""
    return QTensor(torch.empty(rows, cols, dtype=E4M3, device=device),
                   torch.empty(cols // TILE, rows, dtype=torch.float32, device=device).t())


def quantize_act(x: torch.Tensor, power_of_two: bool, rows: bool, cols: bool, capacity: int | None = None,
                 src: torch.Tensor | None = None, multiple: int = TILE) -> tuple[QTensor | None, QTensor | None]:
    """x [R, C] -> (1x128 tiles along C [Rp, Cp] if rows, x^T in 1x128 tiles along R [Cp, Rp] if cols),
    in one pass. Cp = round_up(C, multiple); Rp = round_up(R), or `capacity` with row r of the
    output taken from x[src[r]] (src int32 [capacity], -1 = zero row)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    r, c = x.shape
    rp, cp = (round_up(r) if capacity is None else capacity), round_up(c, multiple)
    by_rows = _tiles(rp, cp, x.device) if rows else None
    by_cols = _tiles(cp, rp, x.device) if cols else None
    if rp and cp and (rows or cols):
        dummy = by_rows or by_cols
        qr, qc = by_rows or dummy, by_cols or dummy
        _quant_act_kernel[(rp // TILE, cp // TILE)](
            x, src if src is not None else x, qr.data, qr.scale, qc.data, qc.scale, r, c, x.stride(0), rp, cp,
            HAS_SRC=src is not None, ROWS=rows, COLS=cols, POW2=power_of_two, num_warps=8)
    return by_rows, by_cols


def quantize_weight(w: torch.Tensor, power_of_two: bool, multiple: int = TILE) -> QTensor:
    """w [N, K] or [E, N, K] -> 128x128 blocks: data [.., Np, Kp], scale [.., Np/128, Kp/128] row-major,
    both sizes padded to a multiple of `multiple`."""
    w3 = w if w.dim() == 3 else w.unsqueeze(0)
    w3 = w3 if w3.stride(-1) == 1 else w3.contiguous()
    e, n, k = w3.shape
    np_, kp = round_up(n, multiple), round_up(k, multiple)
    q = QTensor(torch.empty(e, np_, kp, dtype=E4M3, device=w.device),
                torch.empty(e, np_ // TILE, kp // TILE, dtype=torch.float32, device=w.device))
    if e and np_ and kp:
        _quant_weight_kernel[(np_ // TILE, kp // TILE, e)](w3, q.data, q.scale, n, k, w3.stride(0), w3.stride(1),
                                                           POW2=power_of_two, num_warps=8)
    return q if w.dim() == 3 else QTensor(q.data[0], q.scale[0])


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
                          triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=5),
                          triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=4),
                          triton.Config({"BLOCK_N": 256}, num_warps=8, num_stages=3),
                          triton.Config({"BLOCK_N": 256}, num_warps=8, num_stages=4)],
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
