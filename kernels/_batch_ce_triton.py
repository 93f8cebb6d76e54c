"""Triton backend of the batch cross-entropy: two kernels, their launchers and the custom op.

Design note. With Z (B, d), R (M, d) and s = scale · Z Rᵀ, the loss needs per row the
log-sum-exp, the target logit and Σ_j s_ij (label smoothing); the gradients are
    G = (softmax(s) − (1−ε)·onehot(t) − ε/M) · scale / B,   dZ = G R,   dR = Gᵀ Z.
* Loss only (no gradient wanted): `_batch_ce_fwd_kernel` fuses the matmul and an online
  softmax (Cut Cross-Entropy): tiles of s live in registers only, nothing of size B × M is
  written, and the kernel returns four fp32 statistics per row and M split (grid B-blocks ×
  M-splits, so small batches still fill the GPU). Logits stay fp32 (fp32 accumulation).
* Loss and gradients (training): gradients are computed in the forward pass (Liger-Kernel's
  fused linear cross-entropy). For a chunk of Bc rows, cuBLAS writes S = Z_c Rᵀ (Bc, M) in the
  input dtype (as PyTorch's matmul does), `_batch_ce_chunk_kernel` runs an online softmax over
  each row in fp32 and overwrites S in place with G, and cuBLAS finishes dZ_c = G R and
  accumulates dR += Gᵀ Z_c. Three matmuls, as in eager PyTorch, never the (B, M) logits.
  Cost: dR is read and written once per chunk, so fewer, larger chunks are faster; Bc is set
  by a workspace budget, max(_MIN_WORKSPACE_BYTES, input bytes / 4) = O((B + M)·d).
  Why not one kernel for the gradients too: each output tile of dZ or dR is (rows × d) and, for d
  up to 4096, does not fit in registers, so a single kernel must either recompute s once per
  d-slice or add into dZ and dR with atomics (Cut Cross-Entropy does; it pays off there because
  it skips the tiles whose softmax is ~0, which label smoothing ε > 0 forbids here).
The backward multiplies the saved gradients by the incoming scalar gradient in place (eager), so
it runs once per forward: retain_graph and double backward are refused with a clear error.
Targets must lie in [0, M); they are not checked on the device.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when this module is imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# Workspace budget of the training path's logits chunk (read at each call; the benchmark sweeps
# it): max(_MIN_WORKSPACE_BYTES, input bytes / _WORKSPACE_DIVISOR), O((B + M)·d).
_MIN_WORKSPACE_BYTES = 64 * 2**20
_WORKSPACE_DIVISOR = 4


@triton.jit
def _batch_ce_fwd_kernel(
    z_ptr,  # (B, D) features, unit stride along D
    r_ptr,  # (M, D) candidate rows, unit stride along D
    t_ptr,  # (B,) int target positions in [0, M)
    part_ptr,  # (4, S, B) fp32 out, per M split: running max, Σ exp(s − max), Σ s, target logit
    B,
    M,
    D,
    stride_z,  # elements between rows of z
    stride_r,  # elements between rows of r
    scale,  # logit scale
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,  # dot in fp32: the interpreter cannot dot bf16
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 like PyTorch's default, else "tf32"
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    n_tiles = tl.cdiv(M, BLOCK_M)
    per_split = tl.cdiv(n_tiles, n_split)
    tile_lo = pid_s * per_split
    tile_hi = tl.minimum(tile_lo + per_split, n_tiles)  # may be empty: stats stay (−inf, 0, 0, 0)

    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    offs_d = tl.arange(0, BLOCK_D)
    tgt = tl.load(t_ptr + offs_b, mask=mask_b, other=-1)
    z_rows = z_ptr + offs_b.to(tl.int64)[:, None] * stride_z  # (BLOCK_B, 1)

    m_i = tl.full([BLOCK_B], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_B], tl.float32)
    sum_i = tl.zeros([BLOCK_B], tl.float32)
    tgt_i = tl.zeros([BLOCK_B], tl.float32)
    for tile in range(tile_lo, tile_hi):
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        r_rows = r_ptr + offs_m.to(tl.int64)[:, None] * stride_r  # (BLOCK_M, 1)
        acc = tl.zeros([BLOCK_B, BLOCK_M], tl.float32)
        for k in range(0, D, BLOCK_D):
            dk = k + offs_d
            mask_d = dk < D
            z_t = tl.load(z_rows + dk[None, :], mask=mask_b[:, None] & mask_d[None, :], other=0.0)
            r_t = tl.load(r_rows + dk[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            if UPCAST:
                z_t = z_t.to(tl.float32)
                r_t = r_t.to(tl.float32)
            acc = tl.dot(z_t, tl.trans(r_t), acc, input_precision=DOT_PRECISION)
        s = acc * scale  # (BLOCK_B, BLOCK_M) fp32 logits, registers only
        s_inf = tl.where(mask_m[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_inf, axis=1))  # finite: every tile has a valid column
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s_inf - m_new[:, None]), axis=1)
        m_i = m_new
        sum_i += tl.sum(tl.where(mask_m[None, :], s, 0.0), axis=1)
        tgt_i += tl.sum(tl.where(offs_m[None, :] == tgt[:, None], s, 0.0), axis=1)

    n_split_b = n_split.to(tl.int64) * B
    out = part_ptr + pid_s.to(tl.int64) * B + offs_b
    tl.store(out, m_i, mask=mask_b)
    tl.store(out + n_split_b, l_i, mask=mask_b)
    tl.store(out + 2 * n_split_b, sum_i, mask=mask_b)
    tl.store(out + 3 * n_split_b, tgt_i, mask=mask_b)


@triton.jit
def _batch_ce_chunk_kernel(
    s_ptr,  # (n, M) unscaled logits Z_c Rᵀ, input dtype; overwritten in place with dloss/dS
    t_ptr,  # (n,) int target positions in [0, M)
    loss_ptr,  # (n,) fp32 out: per-row smoothed loss
    M,
    stride_s,  # elements between rows of s
    scale,  # logit scale
    eps,  # label smoothing ε
    grad_scale,  # scale / B: mean over the whole batch, chain rule through the scale
    BLOCK_M: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    tgt = tl.load(t_ptr + row)
    offs = tl.arange(0, BLOCK_M)

    # Pass 1: online softmax statistics of the row (Liger's cross-entropy kernel).
    m_i = float("-inf")
    l_i = 0.0
    sum_i = 0.0
    for start in range(0, M, BLOCK_M):
        cols = start + offs
        mask = cols < M
        x = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32) * scale
        x_inf = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x_inf, axis=0))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(x_inf - m_new), axis=0)
        m_i = m_new
        sum_i += tl.sum(tl.where(mask, x, 0.0), axis=0)
    lse = m_i + tl.log(l_i)
    x_t = tl.load(s_row + tgt, mask=(tgt >= 0) & (tgt < M), other=0.0).to(tl.float32) * scale
    tl.store(loss_ptr + row, lse - (1.0 - eps) * x_t - eps * sum_i / M)

    # Pass 2: the gradient, written over the logits it came from (the row is still in L2).
    for start in range(0, M, BLOCK_M):
        cols = start + offs
        mask = cols < M
        x = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32) * scale
        g = tl.exp(x - lse) - eps / M
        g = tl.where(cols == tgt, g - (1.0 - eps), g)
        tl.store(s_row + cols, (g * grad_scale).to(s_ptr.dtype.element_ty), mask=mask)


# Launch configurations: the launchers below and tests/unit/test_triton_compile.py (which compiles
# each one for sm_80 and sm_90 and checks shared memory and spills) take them from these functions.
CHUNK_BLOCK_M_CAP = 4096  # the chunk kernel holds one logits row of up to this many columns per block


def fwd_config(dtype: torch.dtype, interpret: bool | None = None) -> tuple[int, int, int, int, int]:
    """(BLOCK_B, BLOCK_M, BLOCK_D, num_warps, num_stages) of the fused forward for `dtype`."""
    if _INTERPRET if interpret is None else interpret:
        return 32, 64, 32, 4, 1
    # Spill-free on sm_80 and sm_90 (ptxas, Triton 3.8): the earlier fp32 (64, 64, 32, 4 warps) and
    # bf16 (128, 128, 64, 8 warps) tiles hit 255 registers and spilled 24-1,300 bytes per thread.
    if dtype == torch.float32:
        return 64, 64, 32, 8, 3
    return 128, 64, 32, 8, 3  # bf16 / fp16 (tensor-core tiles)


def chunk_config(M: int, interpret: bool | None = None) -> tuple[int, int]:
    """(BLOCK_M, num_warps) of the chunk (softmax-gradient) kernel for M candidate rows."""
    cap = 1024 if (_INTERPRET if interpret is None else interpret) else CHUNK_BLOCK_M_CAP
    block_m = min(triton.next_power_of_2(M), cap)
    return block_m, 8 if block_m >= 2048 else 4


FWD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what batch_cross_entropy_fused accepts


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"  # like cuBLAS under PyTorch's default (no TF32)
    return "tf32"


def _num_splits(n_b_blocks: int, M: int, device: torch.device) -> int:
    """M splits so that the fused forward has a few programs per SM even for small B."""
    if _INTERPRET or device.type != "cuda":
        return min(2, triton.cdiv(M, 64))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(4 * sms, n_b_blocks), triton.cdiv(M, 128)))


def batch_ce_loss(
    z: torch.Tensor,  # (B, d)
    rows: torch.Tensor,  # (M, d)
    target: torch.Tensor,  # (B,) int
    label_smoothing: float,
    scale: float,
) -> torch.Tensor:
    """Mean loss without logits in memory: O(B) workspace. Launches `_batch_ce_fwd_kernel`."""
    B, D = z.shape
    M = rows.shape[0]
    block_b, block_m, block_d, warps, stages = fwd_config(z.dtype)
    n_b = triton.cdiv(B, block_b)
    n_split = _num_splits(n_b, M, z.device)
    part = torch.empty(4, n_split, B, device=z.device, dtype=torch.float32)  # (4, S, B)
    _batch_ce_fwd_kernel[(n_b, n_split)](
        z, rows, target, part, B, M, D, z.stride(0), rows.stride(0), scale,
        BLOCK_B=block_b, BLOCK_M=block_m, BLOCK_D=block_d,
        UPCAST=_INTERPRET and z.dtype == torch.bfloat16, DOT_PRECISION=_dot_precision(z.dtype),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    m, l, s_sum, s_tgt = part.unbind(0)  # noqa: E741 - m, l: the online softmax's max and sum; (S, B) each
    m_max = m.amax(0)  # (B,)
    lse = m_max + torch.log((l * torch.exp(m - m_max)).sum(0))
    eps = label_smoothing
    loss = lse - (1.0 - eps) * s_tgt.sum(0) - eps * s_sum.sum(0) / M  # (B,)
    return loss.mean()


def _chunk_rows(B: int, M: int, d: int, elt: int) -> int:
    """Rows per logits chunk: the (rows, M) chunk fits the workspace budget (at least one row)."""
    budget = max(_MIN_WORKSPACE_BYTES, (B + M) * d * elt // _WORKSPACE_DIVISOR)
    rows = budget // (M * elt)
    if rows >= 256:
        rows = rows // 128 * 128  # whole GEMM tiles
    return int(min(B, max(1, rows)))


def batch_ce_loss_and_grads(
    z: torch.Tensor,  # (B, d)
    rows: torch.Tensor,  # (M, d)
    target: torch.Tensor,  # (B,) int
    label_smoothing: float,
    scale: float,
    need_dz: bool,
    need_drows: bool,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean loss and its gradients (for an upstream gradient of 1), chunked over B.

    Workspace: one (Bc, M) chunk in the input dtype. dR accumulates over chunks in the input
    dtype (fp32 inside each matmul). Unrequested gradients come back as empty tensors.
    """
    B, D = z.shape
    M = rows.shape[0]
    n = chunk_rows or _chunk_rows(B, M, D, z.element_size())
    block_m, chunk_warps = chunk_config(M)
    loss_rows = torch.empty(B, device=z.device, dtype=torch.float32)  # (B,)
    dz = torch.empty_like(z) if need_dz else z.new_empty(0)  # (B, d)
    drows = torch.empty_like(rows) if need_drows else rows.new_empty(0)  # (M, d)
    buf = torch.empty(min(n, B), M, device=z.device, dtype=z.dtype)  # (Bc, M) workspace
    for b0 in range(0, B, n):
        b1 = min(B, b0 + n)
        z_c = z[b0:b1]  # (n, d)
        s = buf[: b1 - b0]  # (n, M)
        torch.mm(z_c, rows.T, out=s)
        _batch_ce_chunk_kernel[(b1 - b0,)](
            s, target[b0:b1], loss_rows[b0:b1], M, s.stride(0), scale, label_smoothing,
            scale / B, BLOCK_M=block_m, num_warps=chunk_warps,
        )  # fmt: skip
        # s now holds G (n, M)
        if need_dz:
            torch.mm(s, rows, out=dz[b0:b1])
        if need_drows:
            if b0 == 0:
                torch.mm(s.T, z_c, out=drows)
            else:
                drows.addmm_(s.T, z_c)  # read-modify-write of (M, d) once per chunk
    del buf  # free the workspace before returning
    return loss_rows.mean(), dz, drows


# ---------------------------------------------------------------------------------------------
# Custom op: composes with torch.compile (opaque to Dynamo, shapes from the fake kernel).


@torch.library.custom_op("diet::batch_cross_entropy", mutates_args=())
def _batch_ce_op(
    z: torch.Tensor,
    rows: torch.Tensor,
    target: torch.Tensor,
    label_smoothing: float,
    scale: float,
    need_dz: bool,
    need_drows: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dloss/dz, dloss/drows); the gradients are empty unless asked for."""
    if need_dz or need_drows:
        return batch_ce_loss_and_grads(z, rows, target, label_smoothing, scale, need_dz, need_drows)
    loss = batch_ce_loss(z, rows, target, label_smoothing, scale)
    return loss, z.new_empty(0), rows.new_empty(0)


@_batch_ce_op.register_fake
def _(z, rows, target, label_smoothing, scale, need_dz, need_drows):
    loss = z.new_empty((), dtype=torch.float32)
    dz = torch.empty_like(z) if need_dz else z.new_empty(0)
    drows = torch.empty_like(rows) if need_drows else rows.new_empty(0)
    return loss, dz, drows


def _setup_context(ctx, inputs, output):
    _, dz, drows = output
    ctx.mark_non_differentiable(dz, drows)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(dz, drows)
    ctx.need = inputs[5:7]
    ctx.used = False


def _backward(ctx, g_loss, _g_dz, _g_drows):
    # Eager: scale in place, no (M, d) copy. Traced (AOTAutograd's tensors are subclasses):
    # out of place, as a traced backward may not mutate a forward output.
    in_place = type(g_loss) is torch.Tensor
    if in_place:
        if ctx.used:
            raise RuntimeError(
                "batch_cross_entropy: backward can run once per forward (its gradients were "
                "computed in the forward pass and are scaled in place); recompute the loss "
                "instead of retain_graph=True, or pass backend='reference'."
            )
        if torch.is_grad_enabled():
            raise RuntimeError(
                "batch_cross_entropy: double backward (create_graph=True) is not supported"
            )
        ctx.used = True
    dz, drows = ctx.saved_tensors
    need_dz, need_drows = ctx.need
    g_z = g_rows = None
    if need_dz and ctx.needs_input_grad[0]:
        g_z = dz.mul_(g_loss) if in_place else dz * g_loss
    if need_drows and ctx.needs_input_grad[1]:
        g_rows = drows.mul_(g_loss) if in_place else drows * g_loss
    return g_z, g_rows, None, None, None, None, None


_batch_ce_op.register_autograd(_backward, setup_context=_setup_context)


def batch_cross_entropy_fused(
    z: torch.Tensor,  # (B, d)
    rows: torch.Tensor,  # (M, d)
    target: torch.Tensor,  # (B,) int
    label_smoothing: float = 0.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """The Triton path (CUDA, or CPU tensors under TRITON_INTERPRET=1). Mean loss, fp32, 0-d."""
    device_type = z.device.type
    if torch.is_autocast_enabled(device_type):  # the reference's matmul would run autocast
        dtype = torch.get_autocast_dtype(device_type)
        z, rows = z.to(dtype), rows.to(dtype)
    if z.dtype != rows.dtype:
        raise ValueError(
            f"batch_cross_entropy: z is {z.dtype} but rows is {rows.dtype}; expected one dtype "
            "(or run under torch.autocast)"
        )
    grad = torch.is_grad_enabled()
    need_dz, need_drows = grad and z.requires_grad, grad and rows.requires_grad
    loss, _, _ = _batch_ce_op(
        z.contiguous(), rows.contiguous(), target.contiguous(), float(label_smoothing),
        float(scale), need_dz, need_drows,
    )  # fmt: skip
    return loss


__all__ = ["batch_ce_loss", "batch_ce_loss_and_grads", "batch_cross_entropy_fused"]
