"""The loss algebra: per-example terms, explicit reduction and combinators.

Example::

    from jaxmint import losses
    loss = losses.softmax_cross_entropy(label_smoothing=0.1) + 1e-4 * losses.z_loss()
"""

from jaxmint.losses._algebra import Loss as Loss
from jaxmint.losses._algebra import LossError as LossError
from jaxmint.losses._algebra import LossInputs as LossInputs
from jaxmint.losses._algebra import Term as Term
from jaxmint.losses._algebra import masked as masked
from jaxmint.losses._algebra import named as named
from jaxmint.losses._algebra import stop_gradient as stop_gradient
from jaxmint.losses._algebra import term as term
from jaxmint.losses._algebra import uncertainty_weighted as uncertainty_weighted
from jaxmint.losses._builtins import huber as huber
from jaxmint.losses._builtins import l2 as l2
from jaxmint.losses._builtins import mse as mse
from jaxmint.losses._builtins import sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy
from jaxmint.losses._builtins import softmax_cross_entropy as softmax_cross_entropy
from jaxmint.losses._builtins import z_loss as z_loss
from jaxmint.losses._chunked import chunked_cross_entropy as chunked_cross_entropy

__all__ = [
    "Loss",
    "LossError",
    "LossInputs",
    "Term",
    "chunked_cross_entropy",
    "huber",
    "l2",
    "masked",
    "mse",
    "named",
    "sigmoid_binary_cross_entropy",
    "softmax_cross_entropy",
    "stop_gradient",
    "term",
    "uncertainty_weighted",
    "z_loss",
]
