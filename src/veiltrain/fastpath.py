"""Speed patches to CrypTen for the party processes (applied by mpc.session only).

- Binary gates. Profiled on a 262k-element comparison (a small CNN's ReLU): a third of the
  party's time went to tensor clones, because BinarySharedTensor's `^` and `&` clone the operand
  and then clone the broadcast result again, once per gate of the adder circuit. These versions
  allocate the result once.
- Beaver products. CrypTen finishes z = c + eps*b + a*delta + eps*delta with three local products
  (three int64 convolutions for a conv layer: 60 % of a ResNet18 party's time). The product is
  bilinear, so eps*b + eps*delta = eps*(b + delta): two, with party 0 adding delta to its b.
- Conv2d weight gradients. CrypTen repeats grad_output C_in times and runs a convolution with
  N * C_in groups (for a 512-channel ResNet18 layer at batch 32: 8M single-channel maps, most
  of a step and gigabytes per party). Here it is one Beaver matmul of grad_output (C_out, N*L)
  with the input's patches (N*L, C_in*kh*kw), the patches cut locally from the shares.

tests/test_fastpath.py checks every patch against CrypTen's own: bit for bit, except the kernel
gradient, which is truncated once instead of once per sample (at most N units of 2^-16 apart).
"""

from __future__ import annotations

from typing import Any

import torch

_ORIGINAL: dict[str, Any] = {}
_BEAVER = "__beaver_protocol"  # a module-level name in crypten.mpc.primitives.beaver


def _xor(self: Any, y: Any) -> Any:
    """x ^ y with one new tensor (CrypTen's copies x twice before XOR-ing in place)."""
    from crypten.mpc.primitives.binary import BinarySharedTensor

    result = self.shallow_copy()
    if isinstance(y, BinarySharedTensor):
        result.share = self.share ^ y.share
    elif torch.is_tensor(y) or isinstance(y, int):
        # A public operand is XOR-ed into party 0's share only; the others keep theirs.
        result.share = self.share ^ y if self.rank == 0 else _broadcast_copy(self.share, y)
    else:
        raise TypeError(f"Cannot XOR {type(y)} with {type(self)}.")
    return result


def _and(self: Any, y: Any) -> Any:
    """x & y with one new tensor (a Beaver AND for a shared y, a local AND for a public one)."""
    from crypten.mpc.primitives import beaver
    from crypten.mpc.primitives.binary import BinarySharedTensor

    result = self.shallow_copy()
    if isinstance(y, BinarySharedTensor):
        # As CrypTen does: x is broadcast to y's shape first (the triple has x's size).
        result.share = _broadcast(self.share, y.share)
        result.share = beaver.AND(result, y).share
    elif torch.is_tensor(y) or isinstance(y, int):
        result.share = self.share & y
    else:
        raise TypeError(f"Cannot AND {type(y)} with {type(self)}.")
    return result


def _beaver(op: str, x: Any, y: Any, *args: Any, **kwargs: Any) -> Any:
    """CrypTen's Beaver product (passive security) with two local products instead of three."""
    import crypten
    import crypten.communicator as comm
    from crypten.config import cfg
    from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor
    from crypten.mpc.primitives.beaver import IgnoreEncodings

    if cfg.mpc.active_security or x.device != y.device:
        return _ORIGINAL["beaver"](op, x, y, *args, **kwargs)  # its checks and errors
    provider = crypten.mpc.get_default_provider()
    a, b, c = provider.generate_additive_triple(x.size(), y.size(), op, x.device, *args, **kwargs)
    with IgnoreEncodings([a, b, x, y]):
        epsilon, delta = ArithmeticSharedTensor.reveal_batch([x - a, y - b])
    product = getattr(torch, op)
    # eps * delta is public and added once: party 0 folds it into eps * (b + delta).
    right = b._tensor + delta if comm.get().get_rank() == 0 else b._tensor
    c._tensor += product(epsilon, right, *args, **kwargs)
    c._tensor += product(a._tensor, delta, *args, **kwargs)
    return c


def _conv2d_backward(ctx: Any, grad_output: Any) -> tuple[Any, Any]:
    """CrypTen's conv2d backward with the kernel gradient as one matmul (groups == 1)."""
    input, kernel, padding, stride, dilation, groups = ctx.saved_tensors
    if groups != 1:
        return _ORIGINAL["conv2d_backward"](ctx, grad_output)  # type: ignore[no-any-return]
    from crypten.gradients import _grad_input_padding

    output_padding = _grad_input_padding(
        grad_output, input.size(), stride, padding, tuple(kernel.size()[2:]), dilation=dilation
    )
    grad_input = grad_output.conv_transpose2d(
        kernel, stride=stride, padding=padding, output_padding=output_padding, dilation=dilation
    )
    grad_kernel = _kernel_grad(
        input, grad_output, kernel.size(), padding=padding, stride=stride, dilation=dilation
    )
    return grad_input, grad_kernel


def _kernel_grad(
    input: Any, grad_output: Any, size: Any, *, padding: Any, stride: Any, dilation: Any
) -> Any:
    """dL/dW[o, c, i, j] = sum over n, y, x of g[n, o, y, x] * xpad[n, c, y*s + i*d, x*s + j*d]."""
    import crypten

    out_channels, in_channels, kh, kw = size
    n, _, oh, ow = grad_output.size()
    padded = input.pad((padding[1], padding[1], padding[0], padding[0]))
    patches = crypten.stack(
        [
            padded[
                :,
                :,
                i * dilation[0] : i * dilation[0] + stride[0] * (oh - 1) + 1 : stride[0],
                j * dilation[1] : j * dilation[1] + stride[1] * (ow - 1) + 1 : stride[1],
            ]
            for i in range(kh)
            for j in range(kw)
        ]
    )  # (kh*kw, N, C_in, oh, ow): local slicing of each party's share
    columns = patches.permute(2, 0, 1, 3, 4).reshape(in_channels * kh * kw, n * oh * ow)
    rows = grad_output.permute(1, 0, 2, 3).reshape(out_channels, n * oh * ow)
    return rows.matmul(columns.t()).reshape(out_channels, in_channels, kh, kw)


def _broadcast(share: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """A view of `share` at the shape it broadcasts to against `other` (no copy)."""
    shape = torch.broadcast_shapes(share.shape, other.shape)  # type: ignore[no-untyped-call]
    return share.expand(shape)


def _broadcast_copy(share: torch.Tensor, y: Any) -> torch.Tensor:
    return share.clone() if isinstance(y, int) else _broadcast(share, y).clone()


def install() -> None:
    """Swap in the patches above (idempotent; `uninstall` restores CrypTen's own)."""
    from crypten.gradients import AutogradConv2D
    from crypten.mpc.primitives import beaver
    from crypten.mpc.primitives.binary import BinarySharedTensor

    if _ORIGINAL:
        return
    _ORIGINAL.update(
        xor=BinarySharedTensor.__xor__,
        and_=BinarySharedTensor.__and__,
        beaver=vars(beaver)[_BEAVER],
        conv2d_backward=AutogradConv2D.backward,
    )
    BinarySharedTensor.__xor__ = _xor
    BinarySharedTensor.__and__ = _and
    setattr(beaver, _BEAVER, _beaver)  # beaver.mul, .conv2d, ... look it up by this name
    AutogradConv2D.backward = staticmethod(_conv2d_backward)


def uninstall() -> None:
    """Put CrypTen's own operators back (tests compare both)."""
    from crypten.gradients import AutogradConv2D
    from crypten.mpc.primitives import beaver
    from crypten.mpc.primitives.binary import BinarySharedTensor

    if not _ORIGINAL:
        return
    BinarySharedTensor.__xor__ = _ORIGINAL.pop("xor")
    BinarySharedTensor.__and__ = _ORIGINAL.pop("and_")
    setattr(beaver, _BEAVER, _ORIGINAL.pop("beaver"))
    AutogradConv2D.backward = staticmethod(_ORIGINAL.pop("conv2d_backward"))
