"""
Generation: a prompt read once, then one token at a time, fast on a GPU and the same on every device.

    for step in generate(model, idx, max_new_tokens=500, temperature=0.8, top_k=200, seed=1337):
        ...  # step: the next token of each of the B samples, a list of B ids

The steps, as in fast small-model decoders:
- `prefill`: the prompt (B, T) in one pass, which fills a KVCache allocated once for block_size positions;
- `decode_step`: one new token for every sample. On a CUDA GPU the step, sampling included, has the same
  shapes at every position (attention reads every slot of the cache through a mask), is captured once as a
  CUDA graph and replayed: a token then costs one launch instead of hundreds (at the baby GPT's size
  launching kernels takes longer than running them). Capturing takes milliseconds, where torch.compile would
  take tens of seconds before the first token. Elsewhere the step runs as it is and reads the filled slots;
- with compile=True, torch.compile first fuses that step's small kernels into a few larger ones: tens of
  seconds once, for a faster step after (worth it for long generations; docs/PERFORMANCE.md has the numbers);
- on CUDA the next step is launched before the last one's tokens are read back, so the GPU does not wait
  while Python hands them out;
- past block_size the model sees the last block_size tokens: every further token reads them afresh (a shift
  moves every position, so nothing cached stays valid), exactly what the uncached reference does.

Sampling draws from a stream of uniform numbers of each sample's own (seed, sample number): a sample is the
same whether it runs alone or in a batch, cached or not. `use_cache=False` is the reference path, GPT.forward
on the whole context for every token.
"""

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ddl_gpt import Expand


class KVCache:
    """What generation keeps of the positions seen, so that a new token costs one position's work: per attention
    layer its keys (after rotary and the k-norm) and values, in buffers allocated once for block_size positions,
    and the last taps - 1 embeddings for Expand's convolution. Every decode step then has the same shapes, which
    is what lets a CUDA graph replay it. The state needs no cache: a position's state depends only on its token
    and what attention reads."""

    def __init__(self, config, batch_size, device):
        self.config, self.batch_size, self.device = config, batch_size, device
        self.k, self.v = {}, {}  # attention module -> (B, nh, block_size, hd), allocated at its first prefill
        self.tail = torch.zeros(batch_size, Expand.taps - 1, config.n_embd, device=device)  # (B, taps - 1, d)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # the position the next decode step fills
        self.slots = torch.arange(config.block_size, device=device)  # (block_size,)
        self.fixed_shapes = False  # decode steps read every slot through a mask (set for CUDA graphs)
        self.filled = None       # (1, 1, 1, block_size): which slots a decode step reads (GPT.decode_step)
        self.length = 0          # positions filled (the host's copy of pos)
        self.prefilling = False

    def update(self, attn, k, v):
        """Store the new positions' k, v (B, nh, T, hd) (from slot 0 when prefilling, else at pos); return what
        attention reads (`reads`)."""
        K, V = self.buffers(attn, k.shape, k.dtype, v.dtype)       # 2 x (B, nh, block_size, hd)
        if self.prefilling:
            K[:, :, :k.size(2)] = k
            V[:, :, :v.size(2)] = v
            return k, v, None
        K.index_copy_(2, self.pos, k.to(K.dtype))
        V.index_copy_(2, self.pos, v.to(V.dtype))
        return self.reads(attn, k.size(2))

    def buffers(self, attn, shape, k_dtype, v_dtype):
        """The cache of one attention layer's keys and values, 2 x (B, nh, block_size, hd), allocated at its first
        prefill; slots never written are read only through a mask, and must not be NaN there."""
        if attn not in self.k:
            shape = (self.batch_size, shape[1], self.config.block_size, shape[3])
            new = torch.zeros if self.fixed_shapes else torch.empty
            self.k[attn] = new(shape, dtype=k_dtype, device=self.device)  # (B, nh, block_size, hd)
            self.v[attn] = new(shape, dtype=v_dtype, device=self.device)  # (B, nh, block_size, hd)
        return self.k[attn], self.v[attn]

    def reads(self, attn, T):
        """What attention reads after T positions were stored: when prefilling, those T (causal, no mask); when
        decoding, the slots filled so far, or with fixed_shapes (what a CUDA graph needs) every slot and the
        mask of those filled."""
        K, V = self.k[attn], self.v[attn]                          # 2 x (B, nh, block_size, hd)
        if self.prefilling:
            return K[:, :, :T], V[:, :, :T], None                   # 2 x (B, nh, T, hd)
        if self.fixed_shapes:
            return K, V, self.filled
        return K[:, :, :self.length + 1], V[:, :, :self.length + 1], None  # 2 x (B, nh, S, hd)


CHUNK = 1024  # uniforms drawn per sample at a time
# Attention over a whole context (the prompt, the re-read past block_size) is causal without a mask. cuDNN's
# attention, which PyTorch may pick under bf16, builds a plan for every new length, slow the first time;
# flash and memory-efficient attention need none.
WHOLE_CONTEXT = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class Draws:
    """The uniform numbers that sampling turns into tokens, sample i's from its own generator: (B, CHUNK) at a
    time on the device, read one column per step through a step counter that lives on the device too."""

    def __init__(self, seed, first_sample, batch_size, device):
        self.generators = [torch.Generator().manual_seed(seed * 1_000_003 + first_sample + i) for i in range(batch_size)]
        self.values = torch.empty(batch_size, CHUNK, device=device)  # (B, CHUNK)
        self.step = torch.zeros(1, dtype=torch.long, device=device)  # the column the next token reads
        self.refill()

    def refill(self):
        fresh = torch.stack([torch.rand(CHUNK, generator=g) for g in self.generators])  # (B, CHUNK)
        self.values.copy_(fresh)
        self.step.zero_()

    def next(self):
        """(B, 1) uniforms for this step; the caller refills every CHUNK steps."""
        u = self.values.index_select(1, self.step)  # (B, 1)
        self.step.add_(1)
        return u


def pick(logits, temperature, top_k, vocab_limit, u):
    """Token ids (B, 1) from logits (B, vocab): the likeliest (temperature 0), or sampled by inverting the
    cumulative distribution at the uniforms u (B, 1), which makes the draw a function of u alone."""
    logits = logits[:, :vocab_limit]                                           # (B, <= vocab)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)                            # (B, 1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, [-1]]                        # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = F.softmax(logits, dim=-1).cumsum(dim=-1)                             # (B, vocab)
    # u of exactly 0 (torch.rand can draw it) would pick token 0 even when top-k removed it: count from u > 0
    chosen = (cdf < u.clamp_min(1e-12) * cdf[:, -1:]).sum(dim=-1, keepdim=True)  # (B, 1)
    return chosen.clamp(max=logits.size(-1) - 1)


def cast_weights(model, dtype):
    """Store in `dtype` ("bfloat16", "float16"; "float32" changes nothing) the weights that autocast would cast to it
    at every step: those of the attention, MLP and LM head products, and the gains of the query and key norms
    (their inputs are in dtype, and only a gain of its input's dtype lets the norm run as one fused kernel). At
    batch 1 these casts are a third of a step's kernels. The products are the same, since autocast multiplies in
    dtype either way; the LM head gets its own copy, and the embedding it shares a matrix with keeps float32.
    For a model that only generates: it is changed in place, and returned."""
    if dtype == "float32":
        return model
    for block in model.transformer.h:
        for module in (block.attn.c_attn, block.attn.c_proj, block.attn.q_norm, block.attn.k_norm,
                       block.mlp.c_fc, block.mlp.c_proj):
            module.to(getattr(torch, dtype))
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().to(getattr(torch, dtype)))  # (vocab, d)
    return model


class Decoder:
    """Generation with the cache, on static buffers: the last token in, the next one written back in its place.
    Two steps, each with the same shapes every time, so that on CUDA each is captured once as a CUDA graph and
    then replayed: the decode step (one position, while the cache has room) and the re-read (past block_size:
    the last block_size tokens read afresh)."""

    def __init__(self, model, cache, draws, sampling, use_graph, compile=False):
        self.model, self.cache, self.draws, self.sampling = model, cache, draws, sampling
        if compile:  # fixed shapes: one compilation of each step, the first time it runs
            self.decode = torch.compile(self.decode, dynamic=False, fullgraph=True)
            self.reread = torch.compile(self.reread, dynamic=False, fullgraph=True)
        B, block_size = cache.batch_size, model.config.block_size
        self.token = torch.zeros(B, 1, dtype=torch.long, device=cache.device)           # (B, 1): the latest token
        self.window = torch.zeros(B, block_size, dtype=torch.long, device=cache.device)  # (B, block_size): the
        self.use_graph, self.graphs = use_graph, {}  # last tokens read; graphs: {cache full: its step's graph}
        cache.fixed_shapes = use_graph or compile  # one shape for every step: a graph or a compilation covers all

    def prefill(self, context):
        """Read the context (B, T) and pick the first new token (B, 1)."""
        self.window[:, -context.size(1):] = context
        with sdpa_kernel(WHOLE_CONTEXT):
            logits = self.model.prefill(context, self.cache)                              # (B, vocab)
        self.token.copy_(pick(logits, *self.sampling, self.draws.next()))                 # (B, 1)
        return self.token

    def step(self):
        """The next token of every sample (B, 1), on the device."""
        full = self.cache.length == self.model.config.block_size
        run = self.reread if full else self.decode
        if self.use_graph:
            if full not in self.graphs:
                self.graphs[full] = self.capture(run)
            self.graphs[full].replay()
        else:
            run()
        self.cache.length = min(self.cache.length + 1, self.model.config.block_size)  # a re-read leaves it full
        return self.token

    def decode(self):
        # A decode step's attention reads every slot through a mask of those filled. The memory-efficient kernel
        # takes such a mask and has one plan for one shape; flash attention takes no mask, and cuDNN's attention
        # would build a plan per sequence length (slow the first time, and nothing to gain at one query).
        self.window.copy_(torch.cat((self.window[:, 1:], self.token), dim=1))           # (B, block_size)
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            logits = self.model.decode_step(self.token, self.cache)                     # (B, vocab)
        self.token.copy_(pick(logits, *self.sampling, self.draws.next()))               # (B, 1)

    def reread(self):
        # past block_size every position moves: the cache is filled afresh from the last block_size tokens
        self.window.copy_(torch.cat((self.window[:, 1:], self.token), dim=1))           # (B, block_size)
        with sdpa_kernel(WHOLE_CONTEXT):
            logits = self.model.prefill(self.window, self.cache)                        # (B, vocab)
        self.token.copy_(pick(logits, *self.sampling, self.draws.next()))               # (B, 1)

    def capture(self, run):
        """Record `run` as a CUDA graph. A warm-up run first (on a side stream, as capture needs), which also
        compiles the Triton kernels; it changes the buffers, which are then put back."""
        buffers = [self.token, self.window, self.cache.pos, self.cache.tail, self.draws.step]
        saved = [b.clone() for b in buffers]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream().wait_stream(stream)
        for b, s in zip(buffers, saved):
            b.copy_(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        return graph


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, vocab_limit=None, seed=1337, first_sample=0,
             dtype="float32", use_cache=True, use_graph=None, compile=False):
    """Yield, max_new_tokens times, the next token of every sample (a list of B ints) that continue idx (B, T).
    temperature=0 is greedy; top_k keeps the k likeliest; vocab_limit keeps padded-vocabulary ids that no
    tokenizer can decode out of the sample. Sample b draws from (seed, first_sample + b). dtype: "float32", or
    the autocast precision ("bfloat16", "float16"; cast_weights makes it faster). use_graph: CUDA graphs for the
    decode step (default: on CUDA). compile: torch.compile the decode step first (with the cache only)."""
    yield from tokens(model, idx, max_new_tokens, (temperature, top_k, vocab_limit), seed, first_sample,
                      precision(idx.device.type, dtype),
                      use_cache, idx.device.type == "cuda" if use_graph is None else use_graph, compile)


def precision(device_type, dtype):
    """The context a generation step runs in: none for "float32", else autocast to dtype. cache_enabled=False: a
    captured CUDA graph must not read autocast's cached weight copies, freed when the context is left."""
    return nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=getattr(torch, dtype),
                                                                   cache_enabled=False)


class Fetch:
    """The token ids (B, 1) of one step, on their way to the host: on CUDA the copy is queued behind the step and
    waited for only when read, so that the next step can be launched first; elsewhere they are read at once."""

    def __init__(self, token):
        self.ids = token[:, 0].to("cpu", non_blocking=True) if token.is_cuda else token[:, 0].tolist()
        self.done = torch.cuda.Event() if token.is_cuda else None
        if self.done is not None:
            self.done.record()

    def read(self):
        """The B token ids, a list of ints."""
        if self.done is None:
            return self.ids
        self.done.synchronize()
        return self.ids.tolist()


def tokens(model, idx, max_new_tokens, sampling, seed, first_sample, in_precision, use_cache, use_graph, compile):
    """generate's loop; each step runs inside `in_precision` (left before each yield, so that none of it leaks
    into the caller's code between tokens). A step's tokens are handed out once the next step is launched."""
    block_size, (B, T), device = model.config.block_size, idx.size(), idx.device
    draws = Draws(seed, first_sample, B, device)
    context = idx[:, -block_size:]                                           # (B, <= block_size): what the model sees
    decoder = Decoder(model, KVCache(model.config, B, device), draws, sampling, use_graph, compile) if use_cache else None
    launched = None  # the last step's Fetch
    for n in range(max_new_tokens):
        if n % CHUNK == 0 and n > 0:
            draws.refill()
        with in_precision:
            if not use_cache:  # the reference: every token computed from scratch over the whole context
                logits = model(context)[0][:, -1]                                # (B, vocab)
                token = pick(logits, *sampling, draws.next())                    # (B, 1)
                context = torch.cat((context, token), dim=1)[:, -block_size:]    # (B, <= block_size)
            else:
                token = decoder.prefill(context) if n == 0 else decoder.step()   # (B, 1)
        if launched is not None:
            yield launched.read()
        launched = Fetch(token)
    if launched is not None:
        yield launched.read()
