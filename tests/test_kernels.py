"""
The fused delta write (ddl_kernels.py) against the plain PyTorch code it replaces (ddl_gpt.py), and the
switch between them. The kernel runs on a CUDA GPU; without one these tests run it through Triton's
interpreter on the CPU (TRITON_INTERPRET=1), and without Triton at all they are skipped, except the
ones that check the plain path is what runs then.
"""

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import ddl_kernels
from conftest import CountedKernel, random_tokens, tiny_gpt
from ddl_gpt import Compress, DeltaUpdate, GPTConfig
from generate import KVCache, generate
from support.speed import use_kernels

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton is not installed (CPU-only PyTorch)")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


@pytest.fixture
def kernel_device(monkeypatch):
    """Where the kernel runs: the GPU, or the CPU through Triton's interpreter (conftest.py switches it on)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    assert os.environ.get("TRITON_INTERPRET") == "1", "Triton was imported before conftest.py could set it up"
    monkeypatch.setattr(ddl_kernels, "available", lambda X: X.size(-1) in (1, 2, 4, 8))
    return torch.device("cpu")


def update_inputs(config, device, seed=0, B=2, T=19):
    """A DeltaUpdate with random parameters, and random X, x_in, c, h for it (width 48: not a power of two,
    so the kernel's padded block is partly masked)."""
    torch.manual_seed(seed)
    update = DeltaUpdate(config).to(device)
    with torch.no_grad():
        for p in update.parameters():
            p.normal_(0.0, 0.5)
    d, d_v = config.n_embd, config.d_v
    X = torch.randn(B, T, d, d_v, device=device).to(getattr(torch, config.state_dtype))
    x_in, c, h = (torch.randn(B, T, d, device=device) for _ in range(3))
    return update, [X, x_in, c, h]


def switch_kernel(update, on):
    """What GPT.use_kernels does to each DeltaUpdate: its forward replaced by ddl_kernels.fused_forward, or put back."""
    if on:
        update.forward = types.MethodType(ddl_kernels.fused_forward, update)
    else:
        update.__dict__.pop("forward", None)


def run_update(update, inputs, use_kernel, seed=1):
    """Output and the gradients of a random projection of it, for the inputs and the update's parameters."""
    switch_kernel(update, use_kernel)
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = update(*inputs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    (out.float() * weights).sum().backward()
    grads = [t.grad for t in inputs] + [p.grad for p in update.parameters()]
    update.zero_grad(set_to_none=True)
    return out, grads


WRITES = {
    "delta d_v=1": dict(residual="delta", d_v=1),
    "delta d_v=4": dict(residual="delta", d_v=4),
    "write d_v=2": dict(residual="write", d_v=2),
    "delta d_v=4 linear value": dict(residual="delta", d_v=4, value_map="linear"),
    "delta d_v=4 bf16 state": dict(residual="delta", d_v=4, state_dtype="bfloat16"),
}


@needs_triton
@pytest.mark.parametrize("name", WRITES)
def test_fused_write_equals_the_plain_write_in_values_and_gradients(kernel_device, name, monkeypatch):
    config = GPTConfig(n_embd=48, n_head=2, **WRITES[name])
    update, inputs = update_inputs(config, kernel_device)
    plain, plain_grads = run_update(update, inputs, use_kernel=False)
    calls = []
    kernel = ddl_kernels.delta_write
    monkeypatch.setattr(ddl_kernels, "delta_write", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    fused, fused_grads = run_update(update, inputs, use_kernel=True)
    assert calls == [1]   # the kernel itself ran, not the plain code again
    assert fused.dtype == plain.dtype == inputs[0].dtype
    bf16 = config.state_dtype == "bfloat16"
    # bf16 storage: a sum taken in another order, or Triton's interpreter (which truncates instead of rounding),
    # can land one bf16 step (2^-7 of the value) away
    assert torch.allclose(fused.float(), plain.float(), rtol=2**-7 if bf16 else 1e-5, atol=1e-5)
    names = ["X", "x_in", "c", "h"] + [n for n, _ in update.named_parameters()]
    for grad_name, a, b in zip(names, fused_grads, plain_grads):
        assert (a is None) == (b is None), grad_name  # x_in is unused with value_map="linear"
        if a is not None:
            scale = max(b.float().abs().max().item(), 1.0)
            assert (a.float() - b.float()).abs().max().item() <= (2**-7 if bf16 else 1e-5) * scale, grad_name


def run_write_then_read(update, read, inputs, fused, seed=1):
    """X_new and the read of it, and the gradients of a random projection of both, for the inputs and the
    parameters of the update and of the read."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    step = ddl_kernels.fused_write_then_read if fused else DeltaUpdate.write_then_read
    X_new, x = step(update, *inputs, read)
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=generator).to(t.device) for t in (X_new, x)]
    ((X_new.float() * weights[0]).sum() + (x * weights[1]).sum()).backward()
    parameters = list(update.parameters()) + list(read.parameters())
    grads = [t.grad for t in inputs] + [p.grad for p in parameters]
    for p in parameters:
        p.grad = None
    return X_new, x, grads


READ_WRITES = {name: spec for name, spec in WRITES.items() if spec["d_v"] > 1}


@needs_triton
@pytest.mark.parametrize("name", READ_WRITES)
def test_the_write_and_the_next_read_in_one_kernel_equal_the_plain_write_then_compress(kernel_device, name,
                                                                                      monkeypatch):
    """d_v > 1: ddl_kernels.fused_write_then_read computes X_new and the next sublayer's Compress read of it in
    one kernel, and its gradients (the mix's summed over tokens by the backward kernel, over more tokens than one
    program takes); the same values as DeltaUpdate.write_then_read, the write then Compress.forward."""
    config = GPTConfig(n_embd=48, n_head=2, **READ_WRITES[name])
    update, inputs = update_inputs(config, kernel_device, T=ddl_kernels.TOKENS_PER_PROGRAM + 3)
    read = Compress(config).to(kernel_device)
    with torch.no_grad():
        read.mix.normal_(0.0, 0.5)
    X_plain, x_plain, plain_grads = run_write_then_read(update, read, inputs, fused=False)
    calls = []
    kernel = ddl_kernels.delta_write_read
    monkeypatch.setattr(ddl_kernels, "delta_write_read", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    X_fused, x_fused, fused_grads = run_write_then_read(update, read, inputs, fused=True)
    assert calls == [1]
    assert X_fused.dtype == X_plain.dtype == inputs[0].dtype and x_fused.dtype == x_plain.dtype == torch.float32
    bf16 = config.state_dtype == "bfloat16"
    tolerance = 2**-7 if bf16 else 1e-5
    assert torch.allclose(X_fused.float(), X_plain.float(), rtol=tolerance, atol=1e-5)
    with torch.no_grad():                                              # the read is of the X_new stored
        assert torch.allclose(x_fused, read(X_fused), rtol=1e-5, atol=1e-5)
    assert bf16 or torch.allclose(x_fused, x_plain, rtol=1e-5, atol=1e-5)
    names = ["X", "x_in", "c", "h"] + [n for n, _ in update.named_parameters()] + ["mix"]
    assert fused_grads[-1] is not None and fused_grads[-1].abs().max() > 0
    # bf16 state: the plain code rounds the read's gradient to bf16 before adding it to the state's, where the
    # kernel adds the two in fp32; sums over every token (the gate's bias) then differ by a few bf16 steps
    grad_tolerance = 2**-5 if bf16 else 1e-5
    for grad_name, a, b in zip(names, fused_grads, plain_grads):
        assert (a is None) == (b is None), grad_name
        if a is not None:
            scale = max(b.float().abs().max().item(), 1.0)
            assert (a.float() - b.float()).abs().max().item() <= grad_tolerance * scale, grad_name


@needs_triton
@pytest.mark.parametrize("d_v", [1, 4])
def test_the_kernels_dropout_drops_whole_elements_of_the_write_and_its_backward_uses_the_same_mask(kernel_device,
                                                                                                  d_v):
    """With dropout p on the write, an element of the state either stays as it was (dropped) or moves by the
    write / (1 - p); about 1 - p of them move; and the gradients are those of the plain write with that mask.
    Two calls draw two masks, and torch.manual_seed makes them again."""
    p = 0.3
    config = GPTConfig(n_embd=48, n_head=2, residual="delta", d_v=d_v, dropout=p)
    update, inputs = update_inputs(config, kernel_device, T=40)
    update.train()
    read = Compress(config).to(kernel_device)
    torch.manual_seed(5)
    X_new, x, fused_grads = run_write_then_read(update, read, inputs, fused=True)
    kept = X_new != inputs[0]                                         # (B, T, d, d_v): where the write landed
    assert abs(kept.float().mean().item() - (1 - p)) < 0.03
    torch.manual_seed(5)
    assert torch.equal(run_write_then_read(update, read, inputs, fused=True)[0], X_new)
    assert not torch.equal(run_write_then_read(update, read, inputs, fused=True)[0], X_new)

    class MaskedUpdate(DeltaUpdate):
        def forward(self, X, x_in, c, h):                              # the plain write with the kernel's mask
            k, beta, v = self.coefficients(x_in, c, h)
            e = v - (k.unsqueeze(-1) * X).sum(dim=2)                   # (B, T, d_v)
            return X + (beta[..., None, None] * k.unsqueeze(-1)) * e.unsqueeze(-2) * kept / (1 - p)

    masked = MaskedUpdate(config).to(kernel_device)
    masked.load_state_dict(update.state_dict())
    X_plain, x_plain, plain_grads = run_write_then_read(masked, read, inputs, fused=False)
    torch.testing.assert_close(X_new, X_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x, x_plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused_grads, plain_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("name", WRITES)
def test_the_inference_kernel_equals_the_plain_write_under_no_grad_in_eval_mode(kernel_device, name, monkeypatch):
    """ddl_kernels.delta_update computes beta, v and the write in one kernel (what generation runs): the same
    X_new as DeltaUpdate.forward, and it is what the fused forward picks when no gradient is recorded."""
    config = GPTConfig(n_embd=48, n_head=2, **WRITES[name])
    update, (X, x_in, c, h) = update_inputs(config, kernel_device)
    update.eval()
    with torch.no_grad():
        plain = DeltaUpdate.forward(update, X, x_in, c, h)
        direct = ddl_kernels.delta_update(update, X, x_in, c, h)
        calls = []
        kernel = ddl_kernels.delta_update
        monkeypatch.setattr(ddl_kernels, "delta_update", lambda *a, **k: calls.append(1) or kernel(*a, **k))
        monkeypatch.setattr(ddl_kernels, "delta_write", lambda *a, **k: pytest.fail("the autograd kernel ran"))
        switch_kernel(update, True)
        dispatched = update(X, x_in, c, h)
    assert calls == [1]
    assert direct.dtype == dispatched.dtype == plain.dtype == X.dtype and direct.shape == plain.shape
    bf16 = config.state_dtype == "bfloat16"
    for out in (direct, dispatched):
        torch.testing.assert_close(out.float(), plain.float(), rtol=2**-7 if bf16 else 1e-5, atol=1e-5)
    assert not torch.allclose(plain.float(), X.float(), rtol=0, atol=1e-3)   # the write changes the state at all


@needs_triton
@pytest.mark.parametrize("d_v", [1, 4])
def test_a_model_with_fused_writes_has_the_plain_models_loss_and_gradients(kernel_device, d_v):
    models = []
    for fused in (False, True):
        model = tiny_gpt(residual="delta", d_v=d_v).to(kernel_device)
        model.use_kernels(fused)
        idx = random_tokens().to(kernel_device)
        _, loss = model(idx, idx)
        loss.backward()
        models.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = models
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-3), name


@needs_triton
def test_the_kernels_are_operators_that_pass_torch_librarys_checks(kernel_device):
    """ddl::delta_write (alone, with the next read, with dropout), its backward and ddl::delta_update as
    torch.compile sees them: opcheck's default checks
    (the schema, the autograd registration, the fakes' shapes against the kernels' outputs, and the operators
    traced by AOTAutograd with dynamic shapes, gradients included, against the same calls run eagerly)."""
    B, T, d, d_v = 2, 3, 48, 4
    X, g = torch.randn(B, T, d, d_v, device=kernel_device), torch.randn(B, T, d, d_v, device=kernel_device)
    h, x_in, c = (torch.randn(B, T, d, device=kernel_device) for _ in range(3))
    beta, v = torch.rand(B, T, device=kernel_device), torch.randn(B, T, d_v, device=kernel_device)
    mix, g_read = torch.randn(d, d_v, device=kernel_device), torch.randn(B, T, d, device=kernel_device)
    seed = torch.tensor([1234], device=kernel_device)
    graded = [t.clone().requires_grad_() for t in (X, h, beta, v)]
    for erase, read, p in ((True, False, 0.0), (False, False, 0.0), (True, True, 0.0), (True, True, 0.25)):
        mix_graded = mix.clone().requires_grad_() if read else None
        seed_or_none = seed if p > 0 else None
        torch.library.opcheck(torch.ops.ddl.delta_write.default,
                              (*graded, mix_graded, seed_or_none, p, erase, 1e-5))
        torch.library.opcheck(torch.ops.ddl.delta_write_backward.default,
                              (g, g_read if read else None, X, h, beta, v, mix if read else None, seed_or_none, p,
                               erase, 1e-5))
    update, _ = update_inputs(GPTConfig(n_embd=d, n_head=2, d_v=d_v), kernel_device)
    parameters = [p.detach() for p in (update.gate_weight, update.gate_bias, update.value_proj.weight,
                                        update.value_proj.bias)]
    torch.library.opcheck(torch.ops.ddl.delta_update.default, (X, x_in, c, h, *parameters, True, False, 1e-5))


@needs_triton
def test_generating_with_the_inference_kernel_does_not_import_torchdynamo():
    """Calling a torch.library operator the first time imports TorchDynamo (seconds on a GPU machine): outside
    torch.compile, generation launches the inference kernel directly, so that a short sample.py command does not
    wait for it. In a fresh process, through Triton's interpreter where there is no GPU."""
    script = """
import sys, torch
import ddl_kernels
from conftest import CountedKernel, tiny_gpt
from generate import generate
device = "cuda" if torch.cuda.is_available() else "cpu"
if device == "cpu":
    ddl_kernels.available = lambda X: True
model = tiny_gpt(residual="delta", d_v=4).to(device).eval()
model.use_kernels(True)
ddl_kernels._update_kernel = kernel = CountedKernel(ddl_kernels._update_kernel)
list(generate(model, torch.zeros(1, 1, dtype=torch.long, device=device), 3, temperature=0.0))
print(kernel.launches > 0, "torch._dynamo" in sys.modules)
"""
    env = dict(os.environ, TRITON_INTERPRET="1") if not torch.cuda.is_available() else dict(os.environ)
    tests = Path(__file__).resolve().parent
    env["PYTHONPATH"] = os.pathsep.join([str(tests), str(tests.parent)])
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "False"]       # the kernel ran; TorchDynamo was never imported


@needs_triton
@pytest.mark.parametrize("fixed_shapes", [False, True], ids=["slots_filled", "every_slot_masked"])
@pytest.mark.parametrize("mode", [dict(residual="add"), dict(residual="delta", d_v=4)], ids=["add", "delta_dv4"])
@torch.no_grad()
def test_generation_with_the_attention_input_kernel_gives_the_logits_of_forward(kernel_device, mode, fixed_shapes,
                                                                              monkeypatch):
    """With the kernels on, generation's queries, keys and values come from one kernel per layer (rotary, the
    q/k norms, the cache writes): a prompt read by prefill, then decode steps to the end of the cache, give
    GPT.forward's logits at every step, and greedy generation past block_size (re-reads) the uncached tokens."""
    monkeypatch.setattr(ddl_kernels, "heads_available", lambda qkv: True)
    if kernel_device.type == "cpu":                                    # the delta writes' kernels are tested above;
        monkeypatch.setattr(ddl_kernels, "available", lambda X: False)  # interpreting them too would take seconds
    kernel = CountedKernel(ddl_kernels._heads_kernel)
    monkeypatch.setattr(ddl_kernels, "_heads_kernel", kernel)
    model = tiny_gpt(block_size=16, **mode).to(kernel_device).eval()
    generator = torch.Generator().manual_seed(1)
    for p in model.parameters():                                       # off the identity-like init
        p.add_(0.1 * torch.randn(p.shape, generator=generator).to(kernel_device))
    idx = random_tokens().to(kernel_device)[:, :16]                    # (B, 16)
    reference = torch.stack([model(idx[:, :t])[0][:, -1] for t in range(3, 17)], dim=1)  # (B, 14, vocab)
    model.use_kernels(True)
    cache = KVCache(model.config, idx.size(0), kernel_device)
    cache.fixed_shapes = fixed_shapes
    logits = [model.prefill(idx[:, :3], cache)]
    for t in range(3, 16):
        logits.append(model.decode_step(idx[:, t:t + 1], cache))
        cache.length += 1
    assert kernel.launches == model.config.n_layer * 14                # every layer, in the prefill and each step
    torch.testing.assert_close(torch.stack(logits, dim=1), reference, rtol=0, atol=1e-5)
    prompt = idx[:, :12]
    cached = list(generate(model, prompt, 7, temperature=0, use_graph=False))    # 19 tokens > block_size 16
    model.use_kernels(False)
    assert cached == list(generate(model, prompt, 7, temperature=0, use_cache=False))


@needs_triton
def test_a_compiled_model_with_fused_writes_has_the_plain_models_loss_and_gradients(kernel_device, monkeypatch):
    """--compile=True --fused=True: torch.compile keeps each write as one call of the kernels' operators, in
    one graph (fullgraph: no break), forward and backward, and in evaluation; compared with the eager plain code,
    the reference. On the CPU, Inductor compiles the model around the operators, which Triton's interpreter runs."""
    kernels = {name: CountedKernel(getattr(ddl_kernels, name))
               for name in ("_forward_kernel", "_backward_kernel", "_update_kernel")}
    for name, kernel in kernels.items():
        monkeypatch.setattr(ddl_kernels, name, kernel)
    plain = tiny_gpt(residual="delta", d_v=4, n_layer=1).to(kernel_device)
    fused = tiny_gpt(residual="delta", d_v=4, n_layer=1).to(kernel_device)
    fused.use_kernels(True)
    compiled = torch.compile(fused, fullgraph=True)
    idx = random_tokens().to(kernel_device)
    losses = []
    for model in (plain, compiled):
        losses.append(model(idx, idx)[1])
        losses[-1].backward()
    writes = 2 * fused.config.n_layer
    assert [kernel.launches for kernel in kernels.values()] == [writes, writes, 0]
    assert torch.allclose(*losses, atol=1e-5)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-3), name
    plain.eval()
    fused.eval()
    with torch.no_grad():
        assert torch.allclose(plain(idx, idx)[1], compiled(idx, idx)[1], atol=1e-5)
    assert kernels["_update_kernel"].launches == writes


@needs_triton
def test_a_compiled_model_trains_with_the_kernels_own_dropout_in_one_graph(kernel_device, monkeypatch):
    """--compile=True --fused=True with the baby preset's dropout on the write: the seed of each write's mask is
    drawn inside the compiled graph (fullgraph: no break), the kernels run forward and backward, the loss and
    gradients are finite, two steps draw two masks, and torch.manual_seed draws the same ones again."""
    kernels = {name: CountedKernel(getattr(ddl_kernels, name)) for name in ("_forward_kernel", "_backward_kernel")}
    for name, kernel in kernels.items():
        monkeypatch.setattr(ddl_kernels, name, kernel)
    model = tiny_gpt(residual="delta", d_v=4, n_layer=1, dropout=0.3).to(kernel_device).train()
    model.use_kernels(True)
    compiled = torch.compile(model, fullgraph=True)
    idx = random_tokens().to(kernel_device)
    losses = []
    for seed in (1, 2, 1):
        torch.manual_seed(seed)
        loss = compiled(idx, idx)[1]
        loss.backward()
        losses.append(loss.item())
    assert [kernel.launches for kernel in kernels.values()] == [6, 6]     # 2 writes x 3 steps, each way
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert losses[0] != losses[1] and losses[0] == losses[2]


@no_gpu
def test_without_a_gpu_the_plain_path_runs_and_says_so(monkeypatch):
    model = tiny_gpt(residual="delta", d_v=4)
    fused, line = use_kernels(model, None, compiled=False)
    assert not fused and "plain PyTorch" in line
    monkeypatch.setattr(ddl_kernels, "delta_write", lambda *a, **k: pytest.fail("the kernel ran on the CPU"))
    monkeypatch.setattr(ddl_kernels, "delta_update", lambda *a, **k: pytest.fail("the kernel ran on the CPU"))
    idx = random_tokens()
    model(idx, idx)[1].backward()
    with torch.no_grad():
        model.eval()(idx)


def test_with_dropout_on_the_write_training_runs_the_kernel_and_evaluation_runs_it_without(monkeypatch):
    """The kernels draw their own dropout mask: training with dropout on the write runs the autograd kernel with
    p = dropout, evaluation (and dropout on h, which leaves the write whole) with p = 0."""
    calls = []
    monkeypatch.setattr(ddl_kernels, "available", lambda X: True)
    monkeypatch.setattr(ddl_kernels, "delta_write", lambda X, *a, p=0.0, **k: calls.append(p) or X)
    monkeypatch.setattr(ddl_kernels, "delta_update", lambda update, X, *a: calls.append("no grad") or X)
    idx = random_tokens()
    for dropout_at, expected in (("write", 0.5), ("h", 0.0)):
        calls.clear()
        model = tiny_gpt(residual="delta", dropout=0.5, dropout_at=dropout_at)
        model.use_kernels(True)
        model.train()(idx, idx)
        assert calls == [expected] * 2 * model.config.n_layer
        calls.clear()
        model.eval()(idx, idx)
        assert calls == [0.0] * 2 * model.config.n_layer
        with torch.no_grad():
            model(idx)
        assert calls[2 * model.config.n_layer:] == ["no grad"] * 2 * model.config.n_layer


def test_by_default_the_kernels_run_in_training_compiled_or_not_but_not_in_a_compiled_decode_step(monkeypatch):
    """Training measured faster with the kernels than with the plain code fused by torch.compile in two cases of
    four and even in a third; a compiled decode step was measured with the plain code. --fused=True/False override
    either way."""
    monkeypatch.setattr(ddl_kernels, "available", lambda X: True)
    model = tiny_gpt(residual="delta")
    assert use_kernels(model, None, compiled=False)[0]
    fused, line = use_kernels(model, None, compiled=True)
    assert fused and "inside the compiled model" in line
    assert use_kernels(model, None, compiled=False, generation=True)[0]
    fused, line = use_kernels(model, None, compiled=True, generation=True)
    assert not fused and "torch.compile" in line
    assert use_kernels(model, True, compiled=True, generation=True)[0]
    assert not use_kernels(model, False, compiled=False)[0]
    assert not use_kernels(model, False, compiled=True)[0]
    assert use_kernels(tiny_gpt(residual="add"), None, compiled=False) == (True, "residual=add: no delta writes")
    assert not use_kernels(tiny_gpt(residual="add"), None, compiled=True, generation=True)[0]
