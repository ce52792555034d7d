"""bitsandbytes' frozen nf4 and int8 linear layers as they hold memory, for the GPU-memory models only: their
kernels cannot run on fake tensors (shards.fake_cuda), so these hold bitsandbytes' storage at its sizes and
make the transients its matmuls make."""
from typing import Optional

import torch

NF4_BLOCK = 64


class ModelledLinear4bit(torch.nn.Linear):
    """A frozen nf4 linear layer as bitsandbytes' Linear4bit holds and runs it, for memory modelling only (its
    kernels cannot run on fake tensors): the packed 4-bit weight and its statistics at bitsandbytes' sizes
    (blocksize 64, nested statistics); forward and backward hold a dequantized copy of the weight in the
    compute dtype only for the matmul and save nothing of the input, as bitsandbytes' `MatMul4Bit` does for
    a frozen weight. The output is in the compute dtype (`out_in_compute_dtype`, as the trainer's layer
    returns it) or in the input's (as bitsandbytes' own `Linear4bit` does)."""

    def __init__(self, linear: torch.nn.Linear, compute_dtype: torch.dtype, out_in_compute_dtype: bool = True):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype, self.out_in_compute_dtype = compute_dtype, out_in_compute_dtype
        n = self.in_features * self.out_features
        self.weight = torch.nn.Parameter(torch.empty((n + 1) // 2, 1, dtype=torch.uint8), requires_grad=False)
        # Nested statistics: one uint8 absmax per block of 64, and an fp32 absmax per 256 of those.
        self.register_buffer("absmax", torch.empty(-(-n // NF4_BLOCK), dtype=torch.uint8))
        self.register_buffer("absmax2", torch.empty(-(-n // (NF4_BLOCK * 256)), dtype=torch.float32))
        self.bias = None if linear.bias is None else torch.nn.Parameter(
            linear.bias.detach().to(compute_dtype), requires_grad=False)

    def forward(self, x):
        out = _Dequantized4bitMatmul.apply(x.to(self.compute_dtype), self.weight, self.bias, self.out_features,
                                           self.in_features)
        return out if self.out_in_compute_dtype else out.to(x.dtype)


class _Dequantized4bitMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, bias, out_features, in_features):
        ctx.shape, ctx.dtype = (out_features, in_features), x.dtype
        w = torch.empty(out_features, in_features, dtype=x.dtype, device=x.device)  # dequantized for the matmul
        return torch.nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        w = torch.empty(*ctx.shape, dtype=grad.dtype, device=grad.device)
        return grad @ w, None, None, None, None


class ModelledLinear8bit(torch.nn.Linear):
    """A frozen int8 linear layer as bitsandbytes' Linear8bitLt holds it (int8 weight, one fp32 scale per row),
    for memory modelling only. `keeps_input`: bitsandbytes' own layer, whose int8 matmul keeps its input on the
    autograd context (an attribute, out of checkpointing's reach) and returns the input's dtype; else the
    trainer's layer, which keeps nothing and computes in `compute_dtype`. Both cast the input to fp16 for
    the int8 kernels (a transient, with its int8 copy)."""

    def __init__(self, linear: torch.nn.Linear, keeps_input: bool, compute_dtype: Optional[torch.dtype] = None):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.keeps_input, self.compute_dtype = keeps_input, compute_dtype
        self.weight = torch.nn.Parameter(torch.empty(self.out_features, self.in_features, dtype=torch.int8),
                                         requires_grad=False)
        self.register_buffer("scales", torch.empty(self.out_features, dtype=torch.float32))
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().half(),
                                                                        requires_grad=False)

    def forward(self, x):
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        return _Int8Matmul.apply(x, self)


class _Int8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer, ctx.dtype = layer, x.dtype
        a = x.to(torch.float16)
        q = torch.empty(a.shape, dtype=torch.int8, device=x.device)  # the input quantized per row
        del q
        out = torch.empty(*x.shape[:-1], layer.out_features, dtype=x.dtype, device=x.device)
        del a
        if layer.keeps_input:  # as MatMul8bitLt's ctx.tensors keeps it
            ctx.kept = x
        return out

    @staticmethod
    def backward(ctx, grad):
        layer = ctx.layer
        w = torch.empty(layer.out_features, layer.in_features, dtype=grad.dtype, device=grad.device)
        return grad @ w, None


BNB_OPT_BLOCK = 256  # bitsandbytes' blockwise optimizer states: one fp32 absmax per 256 values
BNB_MIN_8BIT_SIZE = 4096  # weights with fewer values keep 32-bit states (bitsandbytes' min_8bit_size)


class ModelledAdamW8bit(torch.optim.Optimizer):
    """bitsandbytes' AdamW8bit as it holds memory, for the GPU-memory models only (its kernels cannot run on
    fake tensors): per weight two uint8 moments and one fp32 absmax per 256 values each (fp32 moments below
    4096 values); its kernel dequantizes and updates in registers, so a step allocates nothing beyond them.
    The update itself is a plain gradient step of the same shape and dtype, which moves no byte count."""

    def __init__(self, params, lr: float = 1e-5, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    small = p.numel() < BNB_MIN_8BIT_SIZE
                    dtype = torch.float32 if small else torch.uint8
                    state["state1"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
                    state["state2"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
                    if not small:
                        blocks = -(-p.numel() // BNB_OPT_BLOCK)
                        state["absmax1"] = torch.zeros(blocks, device=p.device)
                        state["absmax2"] = torch.zeros(blocks, device=p.device)
                p.add_(p.grad, alpha=-group["lr"])
