"""What the modules share: argument checks and the one-device steps of their forward."""

from __future__ import annotations

from torch import Tensor, nn

from .._checks import DtypeError


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return value


def _probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a float in [0, 1), got {value!r}")
    return float(value)


def _tensor(name: str, x, dims: tuple[int, ...], what: str, floating: bool = False) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {what}, got {type(x).__name__}")
    if x.dim() not in dims:
        raise ValueError(f"{name}: expected {what}, got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise DtypeError(f"{name}: expected a floating-point tensor {what}, got dtype {x.dtype} "
                         f"(shape {tuple(x.shape)})")
    return x


class _Local:
    """How the modules' forward computes on one device: its inputs, a linear layer's weights, the
    heads of a mask or bias and the output projection as they are. flexflash.parallel.parallelize
    gives a module a sharded counterpart with the same four steps; forward does not know which it
    runs."""

    @staticmethod
    def inputs(*xs: Tensor) -> list[Tensor]:
        return list(xs)

    @staticmethod
    def weights(linear: nn.Linear) -> tuple[Tensor, Tensor | None]:
        return linear.weight, linear.bias

    @staticmethod
    def heads(t: Tensor | None, heads: int) -> Tensor | None:
        return t

    @staticmethod
    def output(linear: nn.Linear, x: Tensor) -> Tensor:
        return linear(x)


LOCAL = _Local()
