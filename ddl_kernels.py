"""
A fused GPU kernel for the delta write, the one operation where DDL differs from addition.

    X_new = X + beta * k ⊗ (v - kᵀX),   k = h / sqrt(|h|^2 + eps^2)   (residual="write": without - kᵀX)

`DeltaUpdate.forward` in ddl_gpt.py is the reference; this file computes the same thing with one read and
one write of the state per token, forward and backward, instead of the several passes that separate
PyTorch operations make when nothing fuses them (no torch.compile). Two more things ride along:
- the next read (d_v > 1): the sublayer after a write reads the new state through a Compress,
  x = sum_j mix[:, j] X_new[:, j]. The kernel has X_new in registers, so it computes x too and saves a pass
  over the state, forward and backward (`delta_write_read`, what DeltaUpdate.write_then_read computes);
- dropout on the write, with a mask drawn in the kernel from a seed that the backward draws again.
Generation (no autograd) uses `delta_update`, which also computes the gate beta and the value v inside the
kernel: one launch per write where the plain code makes a dozen. `GPT.use_kernels` switches them in by
replacing each DeltaUpdate's forward and write_then_read; DeltaUpdate's own methods stay the equation.

Each kernel is a PyTorch operator (torch.library): ddl::delta_write with its backward
ddl::delta_write_backward, and ddl::delta_update. torch.compile keeps an operator as one opaque call in
the graph it compiles, knowing only its outputs' shapes (the "fakes" below), so a compiled model runs the
kernels too. Inductor then cannot fuse the write with the norms and reads around it, as it does the plain
code; measured compiled, the kernels were still faster in two cases of four, even in one and 3% slower in
one (docs/PERFORMANCE.md), so train.py runs them by default wherever they can; --fused=False: the plain code.

It runs only on CUDA, where Triton comes with PyTorch, and only for d_v in (1, 2, 4, 8); everywhere
else ddl_gpt.py runs its plain PyTorch code. tests/test_kernels.py checks values and gradients against it.

The backward, for one token, with g = dL/dX_new (plus g_read ⊗ mix when the read is fused), e = v - kᵀX,
and g_w = g where the write was kept, 0 where dropped, over 1 - p:
    u = kᵀg_w (d_v);  dL/dv = beta u;  dL/dbeta = e·u;  dL/dX = g - beta k ⊗ u
    dL/dk = beta g_w e - beta X u;  dL/dh = (dL/dk - k (k·dL/dk)) / sqrt(|h|^2 + eps^2)
    dL/dmix = sum over tokens of g_read ⊗ X_new
(residual="write" has e = v and drops both "- beta ... u" terms.)
"""

from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only PyTorch builds do not ship Triton: ddl_gpt.py then uses its plain path
    triton = None


def available(X):
    """Whether the fused kernel can run on the state X (B, T, d, d_v)."""
    return triton is not None and X.is_cuda and X.size(-1) in (1, 2, 4, 8)


def heads_available(qkv):
    """Whether generation's attention-input kernel can run on qkv (B, T, 3 nh, hd)."""
    return triton is not None and qkv.is_cuda


if triton is not None:

    @triton.jit
    def _state_and_direction(X, H, n, D, DV: tl.constexpr, BLOCK_D: tl.constexpr, eps2):
        """Token n's state x (BLOCK_D, DV) and direction k = h / sqrt(|h|^2 + eps^2), in fp32, with 1/sqrt(...) and
        the offsets and mask of its state. BLOCK_D is the width padded to a power of two, masked off."""
        d = tl.arange(0, BLOCK_D)                                 # (BLOCK_D,)
        j = tl.arange(0, DV)                                      # (DV,)
        offs = n * D * DV + d[:, None] * DV + j[None, :]          # (BLOCK_D, DV)
        mask = (d < D)[:, None] & (j < DV)[None, :]               # (BLOCK_D, DV)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + n * D + d, mask=d < D, other=0.0).to(tl.float32)
        rinv = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) + eps2)
        return d, j, offs, mask, x, h * rinv, rinv

    @triton.jit
    def _error(x, k, v, ERASE: tl.constexpr):
        """e = v - kᵀx (DV,), what the write adds along k; without the erase term, v itself."""
        if ERASE:
            e = v - tl.sum(k[:, None] * x, axis=0)
        else:
            e = v
        return e

    @triton.jit
    def _load_token(X, H, BETA, V, n, D, DV: tl.constexpr, BLOCK_D: tl.constexpr, ERASE: tl.constexpr, eps2):
        """_state_and_direction's values, and the token's gate beta and e = v - kᵀx from the given beta and v."""
        d, j, offs, mask, x, k, rinv = _state_and_direction(X, H, n, D, DV, BLOCK_D, eps2)
        beta = tl.load(BETA + n)
        e = _error(x, k, tl.load(V + n * DV + j), ERASE)          # (DV,)
        return d, j, offs, mask, x, k, rinv, beta, e

    @triton.jit
    def _kept(SEED, offs, p):
        """Dropout's mask of the write: True where an element is kept, each with probability 1 - p. The same seed
        and offsets give the same mask, so the backward kernel draws the forward's mask again."""
        return tl.rand(tl.load(SEED).to(tl.uint32), offs.to(tl.uint32)) >= p

    @triton.jit
    def _forward_kernel(X, H, BETA, V, MIX, SEED, X_OUT, READ_OUT, D, eps2, p,
                        DV: tl.constexpr, BLOCK_D: tl.constexpr, ERASE: tl.constexpr, READ: tl.constexpr,
                        DROP: tl.constexpr):
        """One token's write X_new = X + beta k ⊗ e (dropped out if DROP), and with READ the next sublayer's read
        of the stored X_new, x = sum_j mix[:, j] X_new[:, j] (Compress), while X_new is still in registers."""
        n = tl.program_id(0).to(tl.int64)
        d, j, offs, mask, x, k, rinv, beta, e = _load_token(X, H, BETA, V, n, D, DV, BLOCK_D, ERASE, eps2)
        write = (beta * k)[:, None] * e[None, :]                  # (BLOCK_D, DV)
        if DROP:
            write = tl.where(_kept(SEED, offs, p), write / (1.0 - p), 0.0)
        x_new = (x + write).to(X_OUT.dtype.element_ty)            # (BLOCK_D, DV), in the state's storage
        tl.store(X_OUT + offs, x_new, mask=mask)
        if READ:
            mix = tl.load(MIX + d[:, None] * DV + j[None, :], mask=mask, other=0.0)          # (BLOCK_D, DV)
            tl.store(READ_OUT + n * D + d, tl.sum(x_new.to(tl.float32) * mix, axis=1), mask=d < D)

    @triton.jit
    def _backward_kernel(X, H, BETA, V, MIX, SEED, G, G_READ, DX, DH, DBETA, DV_OUT, DMIX, N, D, eps2, p,
                         DV: tl.constexpr, BLOCK_D: tl.constexpr, ERASE: tl.constexpr, READ: tl.constexpr,
                         DROP: tl.constexpr, TOKENS: tl.constexpr):
        """The gradients of _forward_kernel for TOKENS tokens in a row. With READ, the gradient reaching X_new is
        g + g_read ⊗ mix, and the mix's gradient sum_tokens g_read ⊗ X_new is summed here over this program's
        tokens (DMIX holds one (D, DV) sum per program; the caller adds them up). The last program's tokens past
        the end repeat the last token, whose results they store again unchanged, and add nothing to the sum."""
        dmix = tl.zeros((BLOCK_D, DV), dtype=tl.float32)          # (BLOCK_D, DV)
        for t in range(TOKENS):
            n = tl.program_id(0).to(tl.int64) * TOKENS + t
            valid = n < N
            n = tl.minimum(n, N - 1)
            d, j, offs, mask, x, k, rinv, beta, e = _load_token(X, H, BETA, V, n, D, DV, BLOCK_D, ERASE, eps2)
            g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)               # (BLOCK_D, DV)
            if READ:
                mix = tl.load(MIX + d[:, None] * DV + j[None, :], mask=mask, other=0.0)      # (BLOCK_D, DV)
                g_read = tl.load(G_READ + n * D + d, mask=d < D, other=0.0).to(tl.float32)  # (BLOCK_D,)
                g += g_read[:, None] * mix
            g_write = g                                           # (BLOCK_D, DV): the gradient of the write
            if DROP:
                kept = _kept(SEED, offs, p)
                g_write = tl.where(kept, g / (1.0 - p), 0.0)
            u = tl.sum(k[:, None] * g_write, axis=0)              # (DV,)
            dk = beta * tl.sum(g_write * e[None, :], axis=1)      # (BLOCK_D,)
            if ERASE:
                dx = g - (beta * k)[:, None] * u[None, :]         # (BLOCK_D, DV)
                dk -= beta * tl.sum(x * u[None, :], axis=1)
            else:
                dx = g
            dh = rinv * (dk - k * tl.sum(k * dk, axis=0))         # (BLOCK_D,)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            tl.store(DH + n * D + d, dh.to(DH.dtype.element_ty), mask=d < D)
            tl.store(DBETA + n, tl.sum(e * u, axis=0))
            tl.store(DV_OUT + n * DV + j, beta * u)
            if READ:
                write = (beta * k)[:, None] * e[None, :]          # (BLOCK_D, DV)
                if DROP:
                    write = tl.where(kept, write / (1.0 - p), 0.0)
                x_new = (x + write).to(X.dtype.element_ty).to(tl.float32)            # X_new as the forward stored it
                dmix += tl.where(valid, g_read, 0.0)[:, None] * x_new
        if READ:
            pid = tl.program_id(0).to(tl.int64)
            d = tl.arange(0, BLOCK_D)
            j = tl.arange(0, DV)
            tl.store(DMIX + pid * D * DV + d[:, None] * DV + j[None, :], dmix, mask=(d < D)[:, None])

    @triton.jit
    def _update_kernel(X, X_IN, C, H, W_B, B_B, W_V, B_V, X_OUT, D, eps2, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                       ERASE: tl.constexpr, LINEAR_VALUE: tl.constexpr):
        """The whole update of one token, its gate and value included: what generation runs, one launch per
        sublayer instead of the dozen small ones of the plain code (no autograd)."""
        n = tl.program_id(0).to(tl.int64)
        d, j, offs, mask, x, k, rinv = _state_and_direction(X, H, n, D, DV, BLOCK_D, eps2)
        c = tl.load(C + n * D + d, mask=d < D, other=0.0).to(tl.float32)
        w_b = tl.load(W_B + d, mask=d < D, other=0.0).to(tl.float32)
        beta = 2.0 * tl.sigmoid(tl.sum(c * w_b, axis=0) + tl.load(B_B).to(tl.float32))
        if LINEAR_VALUE:
            source = c
        else:
            source = tl.load(X_IN + n * D + d, mask=d < D, other=0.0).to(tl.float32)
        w_v = tl.load(W_V + j[None, :] * D + d[:, None], mask=mask, other=0.0).to(tl.float32)  # (BLOCK_D, DV)
        v = tl.sum(source[:, None] * w_v, axis=0) + tl.load(B_V + j).to(tl.float32)              # (DV,)
        if not LINEAR_VALUE:
            v = 4.0 * tl.sigmoid(v)
        x_new = x + (beta * k)[:, None] * _error(x, k, v, ERASE)[None, :]
        tl.store(X_OUT + offs, x_new.to(X_OUT.dtype.element_ty), mask=mask)


if triton is not None:

    @triton.jit
    def _rotated_and_normed(X, i, swapped, valid, cos, sin, W, HD, eps):
        """One head's query or key at X (HD,): rotated by the position's angle as apply_rotary does (in fp32, then
        rounded to the input's dtype), then RMSNorm with the gain W; in fp32."""
        x = tl.load(X + i, mask=valid, other=0.0)
        x_swapped = tl.load(X + swapped, mask=valid, other=0.0).to(tl.float32)
        y = (x.to(tl.float32) * cos + x_swapped * sin).to(x.dtype).to(tl.float32)
        rinv = 1.0 / tl.sqrt(tl.sum(y * y, axis=0) / HD + eps)
        return y * rinv * tl.load(W + i, mask=valid, other=0.0).to(tl.float32)

    @triton.jit(do_not_specialize=["T"])  # one compilation for the prefill (T > 1) and the decode step (T = 1)
    def _heads_kernel(QKV, COS, SIN, QW, KW, Q_OUT, K_CACHE, V_CACHE, FIRST_SLOT, T, S, eps,
                      NH: tl.constexpr, HD: tl.constexpr, BLOCK_HD: tl.constexpr):
        """Generation's attention inputs for one (sample, position, head): the query and key rotated and
        normalized, the query stored in Q_OUT (B, NH, T, HD), the key and value in the cache's slot (position t
        goes to slot FIRST_SLOT[0] + t). What CausalSelfAttention.heads does in nine kernels per layer (rotary,
        the two norms, the two cache writes and their casts)."""
        pid = tl.program_id(0).to(tl.int64)
        h, t, b = pid % NH, (pid // NH) % T, pid // (NH * T)
        i = tl.arange(0, BLOCK_HD)                                # (BLOCK_HD,)
        valid = i < HD
        swapped = tl.where(i < HD // 2, i + HD // 2, i - HD // 2)  # (BLOCK_HD,): (x2, x1) of the pairs (x1, x2)
        row = QKV + (b * T + t) * 3 * NH * HD
        cos = tl.load(COS + t * HD + i, mask=valid, other=0.0)    # (BLOCK_HD,)
        sin = tl.load(SIN + t * HD + i, mask=valid, other=0.0)    # (BLOCK_HD,)
        slot = tl.load(FIRST_SLOT) + t
        q = _rotated_and_normed(row + h * HD, i, swapped, valid, cos, sin, QW, HD, eps)         # (BLOCK_HD,)
        k = _rotated_and_normed(row + (NH + h) * HD, i, swapped, valid, cos, sin, KW, HD, eps)  # (BLOCK_HD,)
        v = tl.load(row + (2 * NH + h) * HD + i, mask=valid)                                    # (BLOCK_HD,)
        tl.store(Q_OUT + ((b * NH + h) * T + t) * HD + i, q.to(Q_OUT.dtype.element_ty), mask=valid)
        in_cache = ((b * NH + h) * S + slot) * HD + i
        tl.store(K_CACHE + in_cache, k.to(K_CACHE.dtype.element_ty), mask=valid)
        tl.store(V_CACHE + in_cache, v.to(V_CACHE.dtype.element_ty), mask=valid)


def _launch(D, DV, max_warps=16):
    """BLOCK_D (the width padded to a power of two, as Triton's blocks need) and warps for one token's state.
    The training kernels take at most 8: at d = 768, d_v = 4 on an H200 the backward ran in 274 us with 8
    against 450 with 16, the forward in 123 against 135 (docs/PERFORMANCE.md); d_v = 1 gets 4 either way."""
    block_d = triton.next_power_of_2(D)
    return dict(BLOCK_D=block_d, num_warps=min(max_warps, max(4, block_d * DV // 256)))


TOKENS_PER_PROGRAM = 16  # the backward's tokens per program when it sums the read's mix gradient over tokens


@torch.library.custom_op("ddl::delta_write", mutates_args=())
def _delta_write(X: torch.Tensor, h: torch.Tensor, beta: torch.Tensor, v: torch.Tensor, mix: Optional[torch.Tensor],
                 seed: Optional[torch.Tensor], p: float, erase: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """X_new (B, T, d, d_v) from X (B, T, d, d_v), h (B, T, d), beta (B, T) and v (B, T, d_v) in fp32; one program
    per token. With a mix (d, d_v), also the next read of X_new (B, T, d), else an empty tensor in its place. With
    p > 0, dropout on the write, its mask drawn from seed (1,). An operator of its own, so that torch.compile keeps
    it as one call in the graph it compiles."""
    X, h, beta, v = X.contiguous(), h.contiguous(), beta.contiguous(), v.contiguous()
    mix = mix.contiguous() if mix is not None else None
    B, T, D, DV = X.shape
    X_new = torch.empty_like(X)                                       # (B, T, d, d_v)
    read = X.new_empty((B, T, D) if mix is not None else (0,), dtype=torch.float32)  # (B, T, d) or (0,)
    _forward_kernel[(B * T,)](X, h, beta, v, mix if mix is not None else v, seed if p > 0 else beta, X_new, read, D,
                              eps * eps, p, DV=DV, ERASE=erase, READ=mix is not None, DROP=p > 0,
                              **_launch(D, DV, max_warps=8))
    return X_new, read


@torch.library.custom_op("ddl::delta_write_backward", mutates_args=())
def _delta_write_backward(g: torch.Tensor, g_read: Optional[torch.Tensor], X: torch.Tensor, h: torch.Tensor,
                          beta: torch.Tensor, v: torch.Tensor, mix: Optional[torch.Tensor],
                          seed: Optional[torch.Tensor], p: float, erase: bool, eps: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dX, dh, dbeta, dv and dmix (an empty tensor without a mix) of ddl::delta_write, from g = dL/dX_new
    (B, T, d, d_v) and g_read = dL/dread (B, T, d): the equations at the top."""
    g, X, h, beta, v = g.contiguous(), X.contiguous(), h.contiguous(), beta.contiguous(), v.contiguous()
    B, T, D, DV = X.shape
    read = mix is not None
    if read:
        g_read = torch.zeros(B, T, D, device=X.device) if g_read is None else g_read.contiguous()  # (B, T, d)
    tokens = TOKENS_PER_PROGRAM if read else 1
    programs = triton.cdiv(B * T, tokens)
    dX, dh = torch.empty_like(X), torch.empty_like(h)                  # (B, T, d, d_v), (B, T, d)
    dbeta, dv = torch.empty_like(beta), torch.empty_like(v)            # (B, T), (B, T, d_v)
    dmix = X.new_empty((programs, D, DV) if read else (0,), dtype=torch.float32)  # (programs, d, d_v) or (0,)
    _backward_kernel[(programs,)](X, h, beta, v, mix if read else v, seed if p > 0 else beta, g,
                                  g_read if read else g, dX, dh, dbeta, dv, dmix, B * T, D, eps * eps, p,
                                  DV=DV, ERASE=erase, READ=read, DROP=p > 0, TOKENS=tokens,
                                  **_launch(D, DV, max_warps=8))
    return dX, dh, dbeta, dv, dmix.sum(0) if read else dmix


# What torch.compile traces in place of the kernels: outputs of the right shape, dtype and (contiguous) layout.
@_delta_write.register_fake
def _(X, h, beta, v, mix, seed, p, erase, eps):
    B, T, D, _ = X.shape
    return (torch.empty_like(X, memory_format=torch.contiguous_format),                     # (B, T, d, d_v)
            X.new_empty((B, T, D) if mix is not None else (0,), dtype=torch.float32))       # (B, T, d) or (0,)


@_delta_write_backward.register_fake
def _(g, g_read, X, h, beta, v, mix, seed, p, erase, eps):
    grads = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (X, h, beta, v))
    return *grads, (torch.empty_like(mix, dtype=torch.float32) if mix is not None else X.new_empty((0,)))


def _save_inputs(ctx, inputs, output):
    X, h, beta, v, mix, seed, ctx.p, ctx.erase, ctx.eps = inputs
    ctx.save_for_backward(X, h, beta, v, mix, seed)


def _backward(ctx, g, g_read):
    X, h, beta, v, mix, seed = ctx.saved_tensors
    dX, dh, dbeta, dv, dmix = _delta_write_backward(g, g_read if mix is not None else None, X, h, beta, v, mix,
                                                    seed, ctx.p, ctx.erase, ctx.eps)
    return dX, dh, dbeta, dv, dmix if mix is not None else None, None, None, None, None


_delta_write.register_autograd(_backward, setup_context=_save_inputs)


def _seed(X, p):
    """dropout's seed for one write, from PyTorch's generator (so torch.manual_seed and CUDA graphs govern it)."""
    return torch.randint(0, 2**31 - 1, (1,), device=X.device) if p > 0 else None


def delta_write(X, h, beta, v, erase=True, eps=1e-5, p=0.0):
    """X + beta * k ⊗ (v - kᵀX) with k = h / sqrt(|h|^2 + eps^2), fused: (B, T, d, d_v), the write dropped out
    with probability p. beta (B, T) and v (B, T, d_v) enter the kernel in fp32, their gradients leave it so
    (autograd casts them back to the inputs' dtype)."""
    return _delta_write(X, h, beta.float(), v.float(), None, _seed(X, p), p, erase, eps)[0]


def delta_write_read(X, h, beta, v, mix, erase=True, eps=1e-5, p=0.0):
    """delta_write's X_new (B, T, d, d_v) and the next sublayer's read of it, sum_j mix[:, j] X_new[..., j]
    (B, T, d), in one pass over the state: what Block.write computes in two."""
    return _delta_write(X, h, beta.float(), v.float(), mix, _seed(X, p), p, erase, eps)


def _launch_update(X: torch.Tensor, x_in: torch.Tensor, c: torch.Tensor, h: torch.Tensor, gate_weight: torch.Tensor,
                  gate_bias: torch.Tensor, value_weight: torch.Tensor, value_bias: torch.Tensor, erase: bool,
                  linear_value: bool, eps: float) -> torch.Tensor:
    """X_new (B, T, d, d_v) from X (B, T, d, d_v), x_in, c, h (B, T, d) and a DeltaUpdate's parameters. No autograd."""
    X, x_in, c, h = X.contiguous(), x_in.contiguous(), c.contiguous(), h.contiguous()
    B, T, D, DV = X.shape
    X_new = torch.empty_like(X)                                       # (B, T, d, d_v)
    _update_kernel[(B * T,)](X, x_in, c, h, gate_weight, gate_bias, value_weight, value_bias, X_new, D, eps * eps,
                             DV=DV, ERASE=erase, LINEAR_VALUE=linear_value, **_launch(D, DV))
    return X_new


_delta_update = torch.library.custom_op("ddl::delta_update", mutates_args=())(_launch_update)


@_delta_update.register_fake
def _(X, x_in, c, h, gate_weight, gate_bias, value_weight, value_bias, erase, linear_value, eps):
    return torch.empty_like(X, memory_format=torch.contiguous_format)                        # (B, T, d, d_v)


@torch.no_grad()
def delta_update(update, X, x_in, c, h, eps=1e-5):
    """DeltaUpdate `update`'s whole write X -> X_new (B, T, d, d_v), beta and v computed inside the kernel too.
    Without autograd (generation, evaluation): one launch, where the plain code makes a dozen. Outside
    torch.compile the kernel is launched directly: the operator's first call imports TorchDynamo, seconds that
    a short sample.py command would spend waiting."""
    update_op = _delta_update if torch.compiler.is_compiling() else _launch_update
    return update_op(X, x_in, c, h, update.gate_weight, update.gate_bias, update.value_proj.weight,
                     update.value_proj.bias, update.erase, update.linear_value, eps)


def _write_dropout(update):
    """The dropout probability on the whole write while training (0 otherwise: evaluation, or dropout on h)."""
    return update.drop.p if update.training and not update.drop_h else 0.0


def fused_forward(update, X, x_in, c, h):
    """What replaces DeltaUpdate.forward when the kernels are on (GPT.use_kernels): the same equation through
    the kernels above where they can run, else the plain code. The kernels draw their own dropout masks."""
    if not available(X):
        return type(update).forward(update, X, x_in, c, h)
    if update.drop_h:
        h = update.drop(h)                                            # (B, T, d)
    p = _write_dropout(update)
    if not torch.is_grad_enabled() and p == 0:
        return delta_update(update, X, x_in, c, h)                     # (B, T, d, d_v)
    return delta_write(X, h, *update.gate_and_value(x_in, c), erase=update.erase, p=p)  # (B, T, d, d_v)


def fused_write_then_read(update, X, x_in, c, h, read):
    """What replaces DeltaUpdate.write_then_read when the kernels are on: while gradients are recorded and the
    state has d_v > 1, the write and the read of `read` (a Compress) in one kernel; otherwise the two steps."""
    if read.mix is None or not available(X) or not torch.is_grad_enabled():
        X = update(X, x_in, c, h)                                     # (B, T, d, d_v)
        return X, read(X)                                             # (B, T, d, d_v), (B, T, d)
    if update.drop_h:
        h = update.drop(h)                                            # (B, T, d)
    return delta_write_read(X, h, *update.gate_and_value(x_in, c), read.mix, erase=update.erase,
                            p=_write_dropout(update))                 # (B, T, d, d_v), (B, T, d)


def _norm_dtype(norm, x):
    """The dtype of norm(x) for a query or key x of this dtype under the autocast in effect (PyTorch's rules),
    found once by running the norm on one row and remembered on the norm."""
    key = (x.dtype, torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
    found = norm.__dict__.setdefault("_out_dtypes", {})
    if key not in found:
        found[key] = norm(x.new_zeros(1, norm.normalized_shape[0])).dtype
    return found[key]


def fused_heads(attn, qkv, cos, sin, cache=None):
    """What replaces CausalSelfAttention.heads when the kernels are on: in generation (with a cache), on CUDA
    outside torch.compile, one kernel rotates and normalizes the queries and keys and writes the keys and values
    into the cache; anywhere else the plain code."""
    if cache is None or not heads_available(qkv) or torch.compiler.is_compiling():
        return type(attn).heads(attn, qkv, cos, sin, cache)
    B, T, _, hd = qkv.shape
    nh = attn.n_head
    q_dtype, k_dtype = _norm_dtype(attn.q_norm, qkv), _norm_dtype(attn.k_norm, qkv)
    K, V = cache.buffers(attn, (B, nh, T, hd), k_dtype, qkv.dtype)                  # 2 x (B, nh, block_size, hd)
    q = torch.empty(B, nh, T, hd, dtype=q_dtype, device=qkv.device)                 # (B, nh, T, hd)
    first_slot = cache.slots if cache.prefilling else cache.pos      # (1+,): slot 0 when prefilling, else pos
    _heads_kernel[(B * T * nh,)](qkv.contiguous(), cos.contiguous(), sin.contiguous(), attn.q_norm.weight,
                                 attn.k_norm.weight, q, K, V, first_slot, T, K.size(2), attn.q_norm.eps, NH=nh, HD=hd,
                                 BLOCK_HD=triton.next_power_of_2(hd))
    return q, *cache.reads(attn, T)                                                 # 2 x (B, nh, S, hd), mask
