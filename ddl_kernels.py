"""
A fused GPU kernel for the delta write, the one operation where DDL differs from addition.

    X_new = X + beta * k ⊗ (v - kᵀX),   k = h / sqrt(|h|^2 + eps^2)   (residual="write": without - kᵀX)

`DeltaUpdate.forward` in ddl_gpt.py is the reference; this file computes the same thing with one read and
one write of the state per token, forward and backward, instead of the several passes that separate
PyTorch operations make when nothing fuses them (no torch.compile). Generation (no autograd) uses
`delta_update`, which also computes the gate beta and the value v inside the kernel: one launch per write
where the plain code makes a dozen. `GPT.use_kernels` switches both in by replacing each DeltaUpdate's
forward with `fused_forward`; DeltaUpdate.forward itself stays the equation.

Each kernel is a PyTorch operator (torch.library): ddl::delta_write with its backward
ddl::delta_write_backward, and ddl::delta_update. torch.compile keeps an operator as one opaque call in
the graph it compiles, knowing only its outputs' shapes (the "fakes" below), so a compiled model can run
the kernels too. Inductor then cannot fuse the write with the norms and reads around it, as it does the
plain code; which of the two runs faster compiled is for measurements to say (docs/PERFORMANCE.md).
train.py's default runs the kernels only where it does not compile; --fused=True runs them compiled too.

It runs only on CUDA, where Triton comes with PyTorch, and only for d_v in (1, 2, 4, 8); everywhere
else ddl_gpt.py runs its plain PyTorch code. tests/test_kernels.py checks values and gradients against it.

The backward, for one token, with g = dL/dX_new and e = v - kᵀX:
    u = kᵀg (d_v);  dL/dv = beta u;  dL/dbeta = e·u;  dL/dX = g - beta k ⊗ u
    dL/dk = beta g e - beta X u;  dL/dh = (dL/dk - k (k·dL/dk)) / sqrt(|h|^2 + eps^2)
(residual="write" has e = v and drops both "- beta ... u" terms.)
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only PyTorch builds do not ship Triton: ddl_gpt.py then uses its plain path
    triton = None


def available(X):
    """Whether the fused kernel can run on the state X (B, T, d, d_v)."""
    return triton is not None and X.is_cuda and X.size(-1) in (1, 2, 4, 8)


if triton is not None:

    @triton.jit
    def _state_and_direction(X, H, D, DV: tl.constexpr, BLOCK_D: tl.constexpr, eps2):
        """This program's token n: its state x (BLOCK_D, DV) and direction k = h / sqrt(|h|^2 + eps^2), in fp32, with
        1/sqrt(...) and the offsets and mask of its state. BLOCK_D is the width padded to a power of two, masked off."""
        n = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BLOCK_D)                                 # (BLOCK_D,)
        j = tl.arange(0, DV)                                      # (DV,)
        offs = n * D * DV + d[:, None] * DV + j[None, :]          # (BLOCK_D, DV)
        mask = (d < D)[:, None] & (j < DV)[None, :]               # (BLOCK_D, DV)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + n * D + d, mask=d < D, other=0.0).to(tl.float32)
        rinv = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) + eps2)
        return n, d, j, offs, mask, x, h * rinv, rinv

    @triton.jit
    def _error(x, k, v, ERASE: tl.constexpr):
        """e = v - kᵀx (DV,), what the write adds along k; without the erase term, v itself."""
        if ERASE:
            e = v - tl.sum(k[:, None] * x, axis=0)
        else:
            e = v
        return e

    @triton.jit
    def _load_token(X, H, BETA, V, D, DV: tl.constexpr, BLOCK_D: tl.constexpr, ERASE: tl.constexpr, eps2):
        """_state_and_direction's values, and the token's gate beta and e = v - kᵀx from the given beta and v."""
        n, d, j, offs, mask, x, k, rinv = _state_and_direction(X, H, D, DV, BLOCK_D, eps2)
        beta = tl.load(BETA + n)
        e = _error(x, k, tl.load(V + n * DV + j), ERASE)          # (DV,)
        return n, d, j, offs, mask, x, k, rinv, beta, e

    @triton.jit
    def _forward_kernel(X, H, BETA, V, X_OUT, D, eps2,
                        DV: tl.constexpr, BLOCK_D: tl.constexpr, ERASE: tl.constexpr):
        n, d, j, offs, mask, x, k, rinv, beta, e = _load_token(X, H, BETA, V, D, DV, BLOCK_D, ERASE, eps2)
        x_new = x + (beta * k)[:, None] * e[None, :]
        tl.store(X_OUT + offs, x_new.to(X_OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_kernel(X, H, BETA, V, G, DX, DH, DBETA, DV_OUT, D, eps2,
                         DV: tl.constexpr, BLOCK_D: tl.constexpr, ERASE: tl.constexpr):
        n, d, j, offs, mask, x, k, rinv, beta, e = _load_token(X, H, BETA, V, D, DV, BLOCK_D, ERASE, eps2)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.sum(k[:, None] * g, axis=0)                        # (DV,)
        dk = beta * tl.sum(g * e[None, :], axis=1)                # (BLOCK_D,)
        if ERASE:
            dx = g - (beta * k)[:, None] * u[None, :]
            dk -= beta * tl.sum(x * u[None, :], axis=1)
        else:
            dx = g
        dh = rinv * (dk - k * tl.sum(k * dk, axis=0))
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DH + n * D + d, dh.to(DH.dtype.element_ty), mask=d < D)
        tl.store(DBETA + n, tl.sum(e * u, axis=0))
        tl.store(DV_OUT + n * DV + j, beta * u)

    @triton.jit
    def _update_kernel(X, X_IN, C, H, W_B, B_B, W_V, B_V, X_OUT, D, eps2, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                       ERASE: tl.constexpr, LINEAR_VALUE: tl.constexpr):
        """The whole update of one token, its gate and value included: what generation runs, one launch per
        sublayer instead of the dozen small ones of the plain code (no autograd)."""
        n, d, j, offs, mask, x, k, rinv = _state_and_direction(X, H, D, DV, BLOCK_D, eps2)
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


def _launch(D, DV):
    """BLOCK_D (the width padded to a power of two, as Triton's blocks need) and warps for one token's state."""
    block_d = triton.next_power_of_2(D)
    return dict(BLOCK_D=block_d, num_warps=min(16, max(4, block_d * DV // 256)))


@torch.library.custom_op("ddl::delta_write", mutates_args=())
def _delta_write(X: torch.Tensor, h: torch.Tensor, beta: torch.Tensor, v: torch.Tensor, erase: bool, eps: float
                 ) -> torch.Tensor:
    """X_new (B, T, d, d_v) from X (B, T, d, d_v), h (B, T, d), beta (B, T) and v (B, T, d_v) in fp32; one program
    per token. An operator of its own, so that torch.compile keeps it as one call in the graph it compiles."""
    X, h, beta, v = X.contiguous(), h.contiguous(), beta.contiguous(), v.contiguous()
    B, T, D, DV = X.shape
    X_new = torch.empty_like(X)                                       # (B, T, d, d_v)
    _forward_kernel[(B * T,)](X, h, beta, v, X_new, D, eps * eps, DV=DV, ERASE=erase, **_launch(D, DV))
    return X_new


@torch.library.custom_op("ddl::delta_write_backward", mutates_args=())
def _delta_write_backward(g: torch.Tensor, X: torch.Tensor, h: torch.Tensor, beta: torch.Tensor, v: torch.Tensor,
                          erase: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dX, dh, dbeta, dv of ddl::delta_write from g = dL/dX_new (B, T, d, d_v): the equations at the top."""
    g, X, h, beta, v = g.contiguous(), X.contiguous(), h.contiguous(), beta.contiguous(), v.contiguous()
    B, T, D, DV = X.shape
    dX, dh = torch.empty_like(X), torch.empty_like(h)                  # (B, T, d, d_v), (B, T, d)
    dbeta, dv = torch.empty_like(beta), torch.empty_like(v)            # (B, T), (B, T, d_v)
    _backward_kernel[(B * T,)](X, h, beta, v, g, dX, dh, dbeta, dv, D, eps * eps, DV=DV, ERASE=erase,
                               **_launch(D, DV))
    return dX, dh, dbeta, dv


# What torch.compile traces in place of the kernels: outputs of the right shape, dtype and (contiguous) layout.
@_delta_write.register_fake
def _(X, h, beta, v, erase, eps):
    return torch.empty_like(X, memory_format=torch.contiguous_format)                        # (B, T, d, d_v)


@_delta_write_backward.register_fake
def _(g, X, h, beta, v, erase, eps):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (X, h, beta, v))


def _save_inputs(ctx, inputs, output):
    X, h, beta, v, ctx.erase, ctx.eps = inputs
    ctx.save_for_backward(X, h, beta, v)


def _backward(ctx, g):
    return *_delta_write_backward(g, *ctx.saved_tensors, ctx.erase, ctx.eps), None, None


_delta_write.register_autograd(_backward, setup_context=_save_inputs)


def delta_write(X, h, beta, v, erase=True, eps=1e-5):
    """X + beta * k ⊗ (v - kᵀX) with k = h / sqrt(|h|^2 + eps^2), fused: (B, T, d, d_v). beta (B, T) and v (B, T, d_v)
    enter the kernel in fp32, their gradients leave it so (autograd casts them back to the inputs' dtype)."""
    return _delta_write(X, h, beta.float(), v.float(), erase, eps)


@torch.library.custom_op("ddl::delta_update", mutates_args=())
def _delta_update(X: torch.Tensor, x_in: torch.Tensor, c: torch.Tensor, h: torch.Tensor, gate_weight: torch.Tensor,
                  gate_bias: torch.Tensor, value_weight: torch.Tensor, value_bias: torch.Tensor, erase: bool,
                  linear_value: bool, eps: float) -> torch.Tensor:
    """X_new (B, T, d, d_v) from X (B, T, d, d_v), x_in, c, h (B, T, d) and a DeltaUpdate's parameters. No autograd."""
    X, x_in, c, h = X.contiguous(), x_in.contiguous(), c.contiguous(), h.contiguous()
    B, T, D, DV = X.shape
    X_new = torch.empty_like(X)                                       # (B, T, d, d_v)
    _update_kernel[(B * T,)](X, x_in, c, h, gate_weight, gate_bias, value_weight, value_bias, X_new, D, eps * eps,
                             DV=DV, ERASE=erase, LINEAR_VALUE=linear_value, **_launch(D, DV))
    return X_new


@_delta_update.register_fake
def _(X, x_in, c, h, gate_weight, gate_bias, value_weight, value_bias, erase, linear_value, eps):
    return torch.empty_like(X, memory_format=torch.contiguous_format)                        # (B, T, d, d_v)


@torch.no_grad()
def delta_update(update, X, x_in, c, h, eps=1e-5):
    """DeltaUpdate `update`'s whole write X -> X_new (B, T, d, d_v), beta and v computed inside the kernel too.
    Without autograd (generation, evaluation): one launch, where the plain code makes a dozen."""
    return _delta_update(X, x_in, c, h, update.gate_weight, update.gate_bias, update.value_proj.weight,
                         update.value_proj.bias, update.erase, update.linear_value, eps)


def fused_forward(update, X, x_in, c, h):
    """What replaces DeltaUpdate.forward when the kernels are on (GPT.use_kernels): the same equation through
    the kernels above where they can run, else the plain code. Training with dropout on the whole write keeps
    the plain code (the kernel has no dropout)."""
    plain = type(update).forward
    if not available(X) or (update.training and update.drop.p > 0 and not update.drop_h):
        return plain(update, X, x_in, c, h)
    if update.drop_h:
        h = update.drop(h)                                            # (B, T, d)
    if not torch.is_grad_enabled():
        return delta_update(update, X, x_in, c, h)                     # (B, T, d, d_v)
    return delta_write(X, h, *update.gate_and_value(x_in, c), erase=update.erase)  # (B, T, d, d_v)
