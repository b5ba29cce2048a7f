"""Activation names, their kernel ids and parameter defaults; every fastmath choice in one place.

Names follow ONNX's RNN operators (case-insensitive on input, stored lower-case):

=================  =====================================  ==========================
name               function                               default (alpha, beta)
=================  =====================================  ==========================
identity           x                                      --
sigmoid            1 / (1 + exp(-x))                      --
tanh               tanh(x)                                --
relu               max(0, x)                              --
hardsigmoid        min(max(alpha * x + beta, 0), 1)       (0.2, 0.5)
leakyrelu          x if x >= 0 else alpha * x             (0.01, --)
affine             alpha * x + beta                       (1.0, 0.0)
thresholdedrelu    x if x > alpha else 0                  (1.0, --)
scaledtanh         alpha * tanh(beta * x)                 (1.0, 1.0)
elu                x if x >= 0 else alpha * (exp(x) - 1)  (1.0, --)
softsign           x / (1 + abs(x))                       --
softplus           log(1 + exp(x))                        --
softmax            exp(x_i) / sum_j exp(x_j), per row     -- (Dense layers only)
=================  =====================================  ==========================

The defaults are those of the ONNX operators of the same name (the ONNX RNN spec says unspecified
alpha/beta take the defaults of the corresponding operators). A model always stores explicit
``(name, alpha, beta)`` triples, so nothing downstream depends on a default.
"""

from __future__ import annotations

import math

__all__ = [
    "ACTIVATIONS",
    "GRU_ACTIVATIONS",
    "LSTM_ACTIVATIONS",
    "DENSE_ACTIVATIONS",
    "FASTMATH",
    "activation_id",
    "canonical_activation",
]

# Kernel ids: the one source of truth. The kernels import these names as module globals, which
# Numba freezes as compile-time constants; the native file stores names, never ids.
ACT_IDENTITY = 0
ACT_SIGMOID = 1
ACT_TANH = 2
ACT_RELU = 3
ACT_HARDSIGMOID = 4
ACT_LEAKYRELU = 5
ACT_AFFINE = 6
ACT_THRESHOLDEDRELU = 7
ACT_SCALEDTANH = 8
ACT_ELU = 9
ACT_SOFTSIGN = 10
ACT_SOFTPLUS = 11
ACT_SOFTMAX = 12

# name -> (kernel id, default alpha, default beta).
ACTIVATIONS: dict[str, tuple[int, float, float]] = {
    "identity": (ACT_IDENTITY, 0.0, 0.0),
    "sigmoid": (ACT_SIGMOID, 0.0, 0.0),
    "tanh": (ACT_TANH, 0.0, 0.0),
    "relu": (ACT_RELU, 0.0, 0.0),
    "hardsigmoid": (ACT_HARDSIGMOID, 0.2, 0.5),
    "leakyrelu": (ACT_LEAKYRELU, 0.01, 0.0),
    "affine": (ACT_AFFINE, 1.0, 0.0),
    "thresholdedrelu": (ACT_THRESHOLDEDRELU, 1.0, 0.0),
    "scaledtanh": (ACT_SCALEDTANH, 1.0, 1.0),
    "elu": (ACT_ELU, 1.0, 0.0),
    "softsign": (ACT_SOFTSIGN, 0.0, 0.0),
    "softplus": (ACT_SOFTPLUS, 0.0, 0.0),
    "softmax": (ACT_SOFTMAX, 0.0, 0.0),
}

# Which activations take which parameters (used to refuse a parameter that would be ignored).
USES_ALPHA = frozenset({"hardsigmoid", "leakyrelu", "affine", "thresholdedrelu", "scaledtanh", "elu"})
USES_BETA = frozenset({"hardsigmoid", "affine", "scaledtanh"})

GRU_ACTIVATIONS = frozenset(ACTIVATIONS) - {"softmax"}
# ONNX's LSTM takes the same RNN activation list as its GRU, in each of its f, g and h positions.
LSTM_ACTIVATIONS = GRU_ACTIVATIONS
DENSE_ACTIVATIONS = frozenset(ACTIVATIONS)

# LLVM fast-math flags for every kernel. "reassoc" lets dot-product reductions vectorise (without
# it a float sum is a serial chain); "contract" allows fused multiply-add. We deliberately do NOT
# use "nnan"/"ninf": the engine refuses non-finite input, but weights may legitimately drive a
# unit to inf and a kernel must not be allowed to assume that away. "arcp"/"afn" are left out
# because the float32 tanh below is already an explicit approximation with a tested error.
FASTMATH = {"reassoc", "contract", "nsz"}

_ALIASES = {
    "linear": "identity",
    "none": "identity",
    "hard_sigmoid": "hardsigmoid",
    "leaky_relu": "leakyrelu",
    "thresholded_relu": "thresholdedrelu",
    "scaled_tanh": "scaledtanh",
}


def canonical_activation(spec, *, allowed=GRU_ACTIVATIONS, what="activation"):
    """Normalise an activation spec to a ``(name, alpha, beta)`` triple of Python floats.

    Parameters
    ----------
    spec : str or tuple
        ``"tanh"``, ``("leakyrelu", 0.1)`` or ``("hardsigmoid", 0.2, 0.5)``. ONNX capitalisation
        (``"HardSigmoid"``) is accepted. Missing alpha/beta take the ONNX defaults.
    allowed : frozenset of str
        Names allowed in this position (softmax only on Dense layers).
    what : str
        The argument name used in error messages.

    Examples
    --------
    >>> canonical_activation("HardSigmoid")
    ('hardsigmoid', 0.2, 0.5)
    >>> canonical_activation(("LeakyRelu", 0.1))
    ('leakyrelu', 0.1, 0.0)
    """
    if isinstance(spec, str):
        name, params = spec, ()
    elif isinstance(spec, (tuple, list)) and spec and isinstance(spec[0], str):
        name, params = spec[0], tuple(spec[1:])
    else:
        raise TypeError(
            f"{what}: expected an activation name or a (name, alpha[, beta]) tuple, got {spec!r}"
        )
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in ACTIVATIONS or key not in allowed:
        raise ValueError(f"{what}: expected one of {sorted(allowed)}, got {name!r}")
    if len(params) > 2:
        raise ValueError(f"{what}: expected at most (alpha, beta) after the name, got {spec!r}")
    _, alpha, beta = ACTIVATIONS[key]
    # A parameter the activation does not use is refused unless it equals the stored default
    # (0.0), so a value that would be silently ignored never gets through.
    if len(params) >= 1 and params[0] is not None:
        a = _finite_float(params[0], f"{what} alpha")
        if key not in USES_ALPHA and a != alpha:
            raise ValueError(f"{what}: expected no alpha for {key}, got alpha={params[0]!r}")
        alpha = a
    if len(params) == 2 and params[1] is not None:
        b = _finite_float(params[1], f"{what} beta")
        if key not in USES_BETA and b != beta:
            raise ValueError(f"{what}: expected no beta for {key}, got beta={params[1]!r}")
        beta = b
    return (key, float(alpha), float(beta))


def activation_id(name: str) -> int:
    """Kernel id of a canonical activation name."""
    return ACTIVATIONS[name][0]


def _finite_float(value, what):
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what}: expected a real number, got {value!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"{what}: expected a finite number, got {value!r}")
    return f
