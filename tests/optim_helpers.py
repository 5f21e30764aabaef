"""A small model, data and oracles shared by the gradient-norm and batching tests."""

import copy

import torch

from lomo_kernels import ops

# Every backend the optimizers can run here (the Triton kernels in the interpreter on CPU, the CUDA
# kernels in the SIMT emulation).
OPT_BACKENDS = [b for b in ("torch", "native", "triton", "cuda_emulated")
                if ops.available_backends()[b].startswith("loaded")]
DTYPES = [torch.float32, torch.bfloat16]


def model(dtype=torch.float32, seed=0):
    """Small (1-d, and Lomo's <= 65536 elements) and large (72000 elements) parameters."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 300), torch.nn.Tanh(), torch.nn.LayerNorm(300),
        torch.nn.Linear(300, 240), torch.nn.Tanh(), torch.nn.Linear(240, 4),
    ).to(dtype)


def batch(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 16, generator=g).to(dtype)


def loss_of(m, x):
    return m(x).float().pow(2).mean()


def plain_grads(m, x, scale=1.0):
    """The gradients a plain backward of ``loss * scale`` gives (on a copy, no optimizer),
    divided by ``scale``, in float64."""
    ref = copy.deepcopy(m)
    (loss_of(ref, x) * scale).backward()
    return [p.grad.double() / scale for p in ref.parameters()]


def plain_grad_norm(m, x, scale=1.0) -> float:
    grads = plain_grads(m, x, scale)
    return torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()


def train_step(opt, m, x, path, lr=1e-2):
    if path == "fused":
        opt.fused_backward(loss_of(m, x), lr)
    else:
        loss_of(m, x).backward()
        opt.step()


def snapshot(m, opt):
    """Parameters, optimizer state and step outputs, for bitwise comparisons."""
    state = [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
             for p in m.parameters() if p in opt.state]
    return {"params": [p.detach().clone() for p in m.parameters()], "state": state,
            "norm": None if opt.last_grad_norm is None else opt.last_grad_norm.clone(),
            "coef": None if opt.clip_coef is None else opt.clip_coef.clone()}


def assert_bitwise(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"])), "parameters differ"
    for sa, sb in zip(a["state"], b["state"]):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert (torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k]), k
    for key in ("norm", "coef"):
        x, y = a[key], b[key]
        assert (x is None) == (y is None), key
        if x is not None:
            assert torch.equal(x, y) or (torch.isnan(x) and torch.isnan(y)), (key, x, y)
