"""
ddl-gpt: a small GPT whose residual stream is either added to or rewritten by Deep Delta Learning.

Deep Delta Learning (Zhang, Liu, Wang, Gu; arXiv 2601.00417) replaces the additive residual
x <- x + F(x) with a gated delta-rule rewrite of one direction of the stream:

    x <- x + beta * (v - k·x) * k

Each sublayer reads the stream along a unit direction k (its own output, normalized), compares the
reading k·x with a target v, and overwrites that component by a gate beta in (0, 2).

What is in this file, top to bottom:
- the backbone, the same in every mode: pre-norm RMSNorm, rotary positions, RMSNorm on queries and
  keys, causal scaled-dot-product attention, SwiGLU MLP, no biases, tied embedding / LM head;
- the delta update (`DeltaUpdate`), the one piece that differs between residual modes;
- the residual state: X of shape (B, T, d, d_v). d_v = 1 is the ordinary residual stream kept with a
  trailing axis of 1, so that one code path serves every d_v; d_v > 1 is the paper's expanded state,
  read through learned per-feature mixes (`Compress`) and started from the embedding by an optional
  causal token convolution ("EC");
- `residual`: "add" (x + F(x)), "delta" (DDL) or "write" (x + beta*v*k, the erase-free ablation);
- the model's side of generation: `GPT.prefill` / `GPT.decode_step`, which read a prompt, then one token at a
  time with fixed shapes, keeping attention's keys and values in a cache allocated once (generate.py's KVCache);
  `GPT.forward` stays the reference that computes every position from scratch (generate.py samples).
"""

import math
import types
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import ddl_kernels

RESIDUAL_MODES = ("add", "delta", "write")
DROPOUT_PLACES = ("write", "h")
VALUE_MAPS = ("sigmoid", "linear")


@dataclass
class GPTConfig:
    block_size: int = 1024      # longest context; rotary tables are built for this many positions
    vocab_size: int = 50304     # GPT-2's 50257 padded to a multiple of 64 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0        # on attention weights and on every write into the residual state
    dropout_at: str = "write"   # delta/write modes: drop elements of the whole write, or of "h" (turns k)
    residual: str = "delta"     # "add", "delta" or "write": the only switch between the methods
    d_v: int = 1                # value channels per feature of the state; the paper's headline uses 4
    expand_conv: bool = True    # d_v > 1: start the state with a causal token convolution (paper's "EC")
    beta_init: float = 1.0      # gate at init; 1.0 starts in the overwrite regime, as the authors did
    value_map: str = "sigmoid"  # v = 4*sigmoid(W x + b) (authors' code) or "linear": v = W c + b (paper text)
    rope_base: float = 10000.0  # rotary frequency base
    state_dtype: str = "float32"  # the residual state's storage; "bfloat16" halves its memory traffic

    def __post_init__(self):
        for name, choices in (("residual", RESIDUAL_MODES), ("value_map", VALUE_MAPS), ("dropout_at", DROPOUT_PLACES),
                              ("state_dtype", ("float32", "bfloat16"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {choices}")
        if self.d_v < 1:
            raise ValueError(f"d_v={self.d_v}; expected an integer >= 1")
        if self.residual == "add" and self.d_v > 1:
            raise ValueError("residual='add' has no expanded state: use d_v=1, or residual='delta'/'write' with d_v>1")
        if not 0.0 < self.beta_init < 2.0:
            raise ValueError(f"beta_init={self.beta_init}; the gate lives in (0, 2), so pick a value strictly inside")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd={self.n_embd} must split into n_head={self.n_head} heads of even size (rotary)")


def rotary_tables(head_dim, length, base):
    """cos and sin of every (position, frequency) angle, each (length, head_dim) as apply_rotary reads them: the
    head_dim / 2 angles twice over, and sin negative on the first half."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)          # (T, hd/2)
    cos, sin = angles.cos(), angles.sin()                                              # 2 x (T, hd/2)
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)              # 2 x (T, hd)


def apply_rotary(x, cos, sin):
    """Rotate each pair (x1, x2) = (x[i], x[i + hd/2]) of x (B, T, nh, hd) by its position's angle:
    (x1 cos - x2 sin, x2 cos + x1 sin), computed as x * cos + (x2, x1) * sin with rotary_tables' signs."""
    y = x.float()                                                        # (B, T, nh, hd)
    y1, y2 = y.chunk(2, dim=-1)                                          # 2 x (B, T, nh, hd/2)
    swapped = torch.cat((y2, y1), dim=-1)                                # (B, T, nh, hd)
    out = y * cos[:, None, :] + swapped * sin[:, None, :]                # (B, T, nh, hd): the same angles for every head
    return out.type_as(x)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-5)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-5)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, cache=None):
        B, T, C = x.size()
        qkv = self.c_attn(x).view(B, T, 3 * self.n_head, self.head_dim)  # (B, T, 3 nh, hd)
        q, k, v, mask = self.heads(qkv, cos, sin, cache)            # (B, nh, T, hd), 2 x (B, nh, S, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)           # (B, T, C)
        return self.c_proj(y)                                       # (B, T, C)

    def heads(self, qkv, cos, sin, cache=None):
        """Queries (B, nh, T, hd), and the keys and values (B, nh, S, hd) they attend to with its mask (or None:
        causal over the T positions themselves; a single query reads all). `cache` (generation): these positions
        are stored in it, and the keys and values are every position it holds."""
        # rotary and the norms act on the last axis; in this layout they read memory in order (faster than after
        # the transpose), queries and keys rotate in one pass, and one transpose then puts the heads first
        qk = apply_rotary(qkv[:, :, :2 * self.n_head], cos, sin)   # (B, T, 2 nh, hd)
        q, k = qk.split(self.n_head, dim=2)                         # 2 x (B, T, nh, hd)
        q = self.q_norm(q).transpose(1, 2)                          # (B, nh, T, hd)
        k = self.k_norm(k).transpose(1, 2)                          # (B, nh, T, hd)
        v = qkv[:, :, 2 * self.n_head:].transpose(1, 2)             # (B, nh, T, hd)
        if cache is None:
            return q, k, v, None
        return q, *cache.update(self, k, v)                         # 2 x (B, nh, S, hd), mask (1, 1, 1, S) or None


class MLP(nn.Module):
    """SwiGLU: silu(gate) * up, with the hidden width 8d/3 that keeps the parameter count of a 4d MLP."""

    def __init__(self, config):
        super().__init__()
        self.hidden = 8 * config.n_embd // 3
        self.c_fc = nn.Linear(config.n_embd, 2 * self.hidden, bias=False)
        self.c_proj = nn.Linear(self.hidden, config.n_embd, bias=False)

    def forward(self, x):
        gate, up = self.c_fc(x).split(self.hidden, dim=-1)  # 2 x (B, T, hidden)
        return self.c_proj(F.silu(gate) * up)              # (B, T, C)


class DeltaUpdate(nn.Module):
    """Write a sublayer's output h into the residual state X (B, T, d, d_v) by the delta rule.

        k    = h / sqrt(|h|^2 + eps^2)        the direction to read and write: h gives only a direction
        beta = 2 * sigmoid(w_b · c + b_b)     gate in (0, 2), one scalar per token
        v    = 4 * sigmoid(W_v x_in + b_v)    target value per channel, d_v per token
        X   <- X + beta * k ⊗ (v - kᵀX)       for d_v = 1:  x <- x + beta * (v - k·x) * k

    c = RMSNorm(x_in) is what the sublayer read; x_in is the (compressed) state before the sublayer.
    beta = 0 keeps X; beta = 1 overwrites the component along k, so kᵀX_new = v exactly;
    beta -> 2 reflects it (with v = 0, the Householder reflection I - 2kkᵀ).
    residual="write" drops the erase term kᵀX: X <- X + beta * k ⊗ v.
    The gate logit, kᵀX and the update run in fp32 even under bf16 autocast.
    """

    def __init__(self, config):
        super().__init__()
        self.erase = config.residual == "delta"
        self.linear_value = config.value_map == "linear"
        self.gate_weight = nn.Parameter(torch.empty(config.n_embd))
        self.gate_bias = nn.Parameter(torch.tensor(math.log(config.beta_init / (2 - config.beta_init))))
        self.value_proj = nn.Linear(config.n_embd, config.d_v, bias=True)
        # By default dropout acts on the whole write, as additive dropout acts on F(x): dropping elements
        # of h would only turn the direction k (k is normalized), not thin out what reaches the stream.
        # The price: during training a beta = 1 write lands only approximately on v. dropout_at="h"
        # is the other choice, measured against this one in the README.
        self.drop = nn.Dropout(config.dropout)
        self.drop_h = config.dropout_at == "h"

    def coefficients(self, x_in, c, h, eps=1e-5):
        """k (B, T, d), beta (B, T) and v (B, T, d_v) of the equation above, in fp32."""
        h = h.float()
        k = h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) + eps**2)                   # (B, T, d)
        return (k, *self.gate_and_value(x_in, c))

    def gate_and_value(self, x_in, c):
        """beta (B, T) and v (B, T, d_v), in fp32."""
        beta = 2 * torch.sigmoid((c.float() * self.gate_weight).sum(-1) + self.gate_bias)  # (B, T)
        source = c if self.linear_value else x_in
        if self.value_proj.out_features == 1:
            # W_v source + b_v with one output: as a product and a sum over d, like the gate, torch.compile fuses
            # it with its neighbours (a matrix product would be a separate matrix-vector call, ~3% of the step)
            v = (source.float() * self.value_proj.weight[0]).sum(-1, keepdim=True) + self.value_proj.bias  # (B, T, 1)
        else:
            v = self.value_proj(source).float()                                         # (B, T, d_v)
        if not self.linear_value:
            v = 4 * torch.sigmoid(v)                                                    # (B, T, d_v)
        return beta, v

    def forward(self, X, x_in, c, h):
        if self.drop_h:
            h = self.drop(h)                                                            # (B, T, d)
        k, beta, v = self.coefficients(x_in, c, h)
        if self.erase:
            v = v - (k.unsqueeze(-1) * X).sum(dim=2)                                    # (B, T, d_v): v - kᵀX
        write = (beta[..., None, None] * k.unsqueeze(-1)) * v.unsqueeze(-2)              # (B, T, d, d_v)
        return (X + (write if self.drop_h else self.drop(write))).to(X.dtype)           # (B, T, d, d_v)

    def write_then_read(self, X, x_in, c, h, read):
        """This write, then `read` (the next sublayer's Compress) of the new state: (X_new, its reading). One
        step, so that a fused kernel can read the state while it holds it (GPT.use_kernels)."""
        X = self(X, x_in, c, h)                                                         # (B, T, d, d_v)
        return X, read(X)                                                               # (B, T, d)


class Compress(nn.Module):
    """Read a d-vector out of the state: per feature i, x[i] = sum_j mix[i, j] * X[i, j] (paper's "CC")."""

    def __init__(self, config):
        super().__init__()
        d_v = config.d_v
        self.mix = nn.Parameter(torch.full((config.n_embd, d_v), 1.0 / d_v)) if d_v > 1 else None

    def forward(self, X):
        if self.mix is None:
            return X.squeeze(-1).float()    # (B, T, d): with d_v = 1 the state is the stream itself
        return (X * self.mix).sum(dim=-1)   # (B, T, d), fp32 (the mix is) whatever the state's storage


class Expand(nn.Module):
    """Turn the embedding (B, T, d) into the initial state (B, T, d, d_v).

    With `expand_conv` (d_v > 1): a causal depthwise convolution over the last 4 tokens with one weight
    per (tap, feature, channel), started at the identity (only the current token's tap is 1), so that
    at init the state is the embedding repeated over the d_v channels. Otherwise: the repeat itself.
    """
    taps = 4

    def __init__(self, config):
        super().__init__()
        self.d_v = config.d_v
        self.weight = None
        if config.d_v > 1 and config.expand_conv:
            weight = torch.zeros(self.taps, config.n_embd, config.d_v)
            weight[-1] = 1.0  # the last tap looks at the current token
            self.weight = nn.Parameter(weight)

    def forward(self, x):
        if self.weight is None:
            return x.unsqueeze(-1).expand(*x.shape, self.d_v)  # (B, T, d, d_v)
        T = x.size(1)
        past = F.pad(x, (0, 0, self.taps - 1, 0))               # (B, T + taps - 1, d): zeros before the start
        return sum(past[:, j:j + T, :, None] * self.weight[j]   # (B, T, d, d_v)
                   for j in range(self.taps))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.residual = config.residual
        self.ln_1 = nn.RMSNorm(config.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.RMSNorm(config.n_embd, eps=1e-5)
        self.mlp = MLP(config)
        self.compress = Compress(config)  # one per block, read before attention and again before the MLP
        self.drop = nn.Dropout(config.dropout)  # additive mode only: DeltaUpdate drops its own write
        delta = config.residual != "add"
        self.update_attn = DeltaUpdate(config) if delta else None
        self.update_mlp = DeltaUpdate(config) if delta else None

    def forward(self, X, x_in, cos, sin, read_next, cache=None):
        """Attention, then the MLP; each reads the state, and its output h is written back into it. x_in is the
        state X as this block's compress reads it; the block returns X and x_in for the next block, read by
        `read_next` (its Compress, or the final readout). `cache` (generation only): the KVCache that attention
        reads earlier positions from and adds to.

        With residual="add" this is nanoGPT's pre-norm block, x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))
        (pinned by tests/test_model.py::test_additive_mode_is_an_ordinary_pre_norm_gpt). The other modes
        differ in the write alone: the delta rule instead of the sum.
        """
        c = self.ln_1(x_in)                                                      # (B, T, d)  normalize
        h = self.attn(c, cos, sin, cache)                                        # (B, T, d)  sublayer output
        X, x_in = self.write(self.update_attn, X, x_in, c, h, self.compress)     # (B, T, d, d_v), (B, T, d)
        c = self.ln_2(x_in)                                                      # (B, T, d)
        h = self.mlp(c)                                                          # (B, T, d)
        return self.write(self.update_mlp, X, x_in, c, h, read_next)             # (B, T, d, d_v), (B, T, d)

    def write(self, update, X, x_in, c, h, read):
        """Write h into the state, then read the new state for the next sublayer: X (B, T, d, d_v), x (B, T, d)."""
        if self.residual == "add":
            X = X + self.drop(h).to(X.dtype).unsqueeze(-1)       # (B, T, d, 1)    x <- x + h
            return X, read(X)                                   # (B, T, d, 1), (B, T, d)
        return update.write_then_read(X, x_in, c, h, read)      # X <- X + beta k ⊗ (v - kᵀX), then its reading


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            expand=Expand(config),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            readout=Compress(config),
            ln_f=nn.RMSNorm(config.n_embd, eps=1e-5),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one matrix reads tokens in and out
        cos, sin = rotary_tables(config.n_embd // config.n_head, config.block_size, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hd)
        self.register_buffer("rope_sin", sin, persistent=False)  # (block_size, hd)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """The authors' init, with s = 0.5 / sqrt(n_embd):
        - every Linear weight (attention c_attn, MLP c_fc, the value map W_v) and the gate w_b: N(0, s)
        - the output projections (attention and MLP c_proj): N(0, s / sqrt(n_layer)); not zero, since
          the gradient through k = h/|h| grows like 1/|h|
        - token embedding (= LM head): N(0, 0.02)
        - gate bias logit(beta_init / 2) (set in DeltaUpdate), so beta starts around beta_init;
          RMSNorm gains 1; Expand the identity (set in __init__)
        Two choices differ from the authors' code, on purpose:
        - the value bias b_v starts at 0 (theirs: PyTorch's uniform default), so v starts at 4*sigmoid(0) = 2
          give or take W_v x, the same for every d_v;
        - the Compress mixes start at 1/d_v (theirs: random, mean 0, std about 0.008 at d = 768), so the
          first block reads the embedding itself, and a d_v = 4 model with identical channels equals the
          d_v = 1 model (tests/test_wiring.py pins this).
        """
        s = 0.5 / math.sqrt(self.config.n_embd)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module is not self.lm_head:
                std = s / math.sqrt(self.config.n_layer) if name.endswith("c_proj") else s
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, DeltaUpdate):
                nn.init.normal_(module.gate_weight, mean=0.0, std=s)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.02)

    def use_kernels(self, on=True):
        """Run the delta writes, and in generation attention's inputs, through ddl_kernels.py's fused kernels
        where they can (CUDA with Triton; d_v in 1, 2, 4, 8): each DeltaUpdate's forward and write_then_read, and
        each attention's heads, are replaced by the same computation in kernels. on=False puts the reference back."""
        replacements = {DeltaUpdate: dict(forward=ddl_kernels.fused_forward,
                                          write_then_read=ddl_kernels.fused_write_then_read),
                        CausalSelfAttention: dict(heads=ddl_kernels.fused_heads)}
        for module in self.modules():
            for name, fused in replacements.get(type(module), {}).items():
                if on:
                    setattr(module, name, types.MethodType(fused, module))
                else:
                    module.__dict__.pop(name, None)

    def reads_after(self):
        """The read after each block: the next block's Compress, and after the last block the readout."""
        return [block.compress for block in self.transformer.h[1:]] + [self.transformer.readout]

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None):
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size={self.config.block_size}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]   # (T, hd)
        state_dtype = getattr(torch, self.config.state_dtype)
        X = self.transformer.expand(self.transformer.wte(idx)).to(state_dtype)  # (B, T, d, d_v)
        x = self.transformer.h[0].compress(X)             # (B, T, d): the first block's reading of the state
        for block, read_next in zip(self.transformer.h, self.reads_after()):
            X, x = block(X, x, cos, sin, read_next)        # (B, T, d, d_v), (B, T, d)
        x = self.transformer.ln_f(x)                      # (B, T, d): the readout's reading, normalized
        if targets is None:
            return self.lm_head(x[:, [-1], :]).float(), None     # (B, 1, vocab): only what generation needs
        logits = self.lm_head(x)                          # (B, T, vocab), bf16 under autocast
        # the loss in fp32; the fp32 logits stay inside it (returning them would write a second, 2x larger copy)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay on the weight matrices that multiply activations, nowhere else.
        Gains, biases, gates and the identity-started Expand / Compress mixes are left undecayed:
        pulling those towards zero would pull the model away from its starting point, not regularize it."""
        decayed, undecayed = [], []
        for name, p in self.named_parameters():
            is_matrix = p.dim() == 2 and not name.endswith(".mix")
            (decayed if is_matrix else undecayed).append(p)
        assert len(decayed) + len(undecayed) == len(list(self.parameters())), "a parameter is in no group"
        groups = [dict(params=decayed, weight_decay=weight_decay), dict(params=undecayed, weight_decay=0.0)]
        # the fused step (one kernel over all tensors) exists for CUDA and CPU (CPU preset: 0.4 ms per step, not 1.7)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B:
        6 per parameter plus the attention scores. The delta updates add well under 1% and are left out."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    @torch.no_grad()
    def prefill(self, idx, cache):
        """Read a prompt idx (B, T) into an empty cache; the logits (B, vocab) of its last position. The same
        computation as forward, which it equals (in eval mode), with every position's keys and values kept."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"a prompt of {T} tokens is longer than block_size={self.config.block_size}")
        e = self.transformer.wte(idx)                                     # (B, T, d)
        cache.tail.copy_(F.pad(e, (0, 0, Expand.taps - 1, 0))[:, -(Expand.taps - 1):])  # (B, taps - 1, d)
        X = self.transformer.expand(e).to(getattr(torch, self.config.state_dtype))  # (B, T, d, d_v)
        x = self.transformer.h[0].compress(X)                             # (B, T, d)
        cache.prefilling = True
        for block, read_next in zip(self.transformer.h, self.reads_after()):
            X, x = block(X, x, self.rope_cos[:T], self.rope_sin[:T], read_next, cache)  # (B, T, d, d_v), (B, T, d)
        cache.prefilling = False
        cache.pos.fill_(T)
        cache.length = T
        x = self.transformer.ln_f(x[:, -1:])                              # (B, 1, d)
        return self.lm_head(x)[:, 0].float()                              # (B, vocab)

    @torch.no_grad()
    def decode_step(self, token, cache):
        """The logits (B, vocab) after one more token (B, 1) at position cache.pos, which it then advances (the
        caller counts cache.length). With cache.fixed_shapes every tensor has the same shape at every position and
        the position is read on the device: one call can be captured as a CUDA graph and replayed for every token."""
        e = self.transformer.wte(token)                                   # (B, 1, d)
        window = torch.cat((cache.tail, e), dim=1)                        # (B, taps, d): this token and the last ones
        cache.tail.copy_(window[:, 1:])                                   # (B, taps - 1, d)
        X = self.transformer.expand(window)[:, -1:]                       # (B, 1, d, d_v): only this token's state
        X = X.to(getattr(torch, self.config.state_dtype))
        cos, sin = self.rope_cos[cache.pos], self.rope_sin[cache.pos]     # (1, hd)
        if cache.fixed_shapes:
            cache.filled = (cache.slots <= cache.pos).view(1, 1, 1, -1)   # (1, 1, 1, block_size)
        x = self.transformer.h[0].compress(X)                             # (B, 1, d)
        for block, read_next in zip(self.transformer.h, self.reads_after()):
            X, x = block(X, x, cos, sin, read_next, cache)                # (B, 1, d, d_v), (B, 1, d)
        cache.pos.add_(1)
        x = self.transformer.ln_f(x)                                      # (B, 1, d)
        return self.lm_head(x)[:, 0].float()                              # (B, vocab)


@torch.no_grad()
def gate_statistics(model, idx):
    """What the residual writes do on a batch idx (B, T), read off with forward hooks so that the
    forward pass stays as it is. Per layer, [attention, MLP] pairs of
      beta_mean, beta_std: the gate (0 identity, 1 overwrite, 2 reflection); absent in add mode,
      rewrite: mean |v - kᵀX|, how far the state's reading along k is from the target before the write;
    and state_rms: the RMS of the state after each block (every mode)."""
    gates, state_rms = {}, []

    def on_update(update, args, output):
        X, x_in, c, h = args
        k, beta, v = update.coefficients(x_in, c, h)
        reading = (k.unsqueeze(-1) * X.float()).sum(dim=2)  # (B, T, d_v): kᵀX
        gates[update] = (beta.mean().item(), beta.std().item(), (v - reading).abs().mean().item())

    def on_block(block, args, output):
        state_rms.append(output[0].float().pow(2).mean().sqrt().item())

    hooks = [block.register_forward_hook(on_block) for block in model.transformer.h]
    hooks += [m.register_forward_hook(on_update) for m in model.modules() if isinstance(m, DeltaUpdate)]
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    stats = {"state_rms": state_rms}
    if gates:
        pairs = [(gates[block.update_attn], gates[block.update_mlp]) for block in model.transformer.h]
        for i, name in enumerate(("beta_mean", "beta_std", "rewrite")):
            stats[name] = [[attn[i], mlp[i]] for attn, mlp in pairs]
    return stats
