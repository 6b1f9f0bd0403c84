"""Pure-function models: the `Model` contract, flax adapters and built-in models."""

from jaxmint.models._axes import axes_by_path as axes_by_path
from jaxmint.models._constrain import activation_layout as activation_layout
from jaxmint.models._constrain import constrain as constrain
from jaxmint.models._flax import from_linen as from_linen
from jaxmint.models._flax import from_nnx as from_nnx
from jaxmint.models._model import Model as Model
from jaxmint.models._model import join_variables as join_variables
from jaxmint.models._model import split_variables as split_variables
from jaxmint.models._remat import remat as remat
from jaxmint.models._summary import LayerSummary as LayerSummary
from jaxmint.models._summary import ModelSummary as ModelSummary
from jaxmint.models._summary import summary as summary
from jaxmint.models._zoo import chunked_attention as chunked_attention
from jaxmint.models._zoo import cnn as cnn
from jaxmint.models._zoo import mlp as mlp
from jaxmint.models._zoo import portable_attention as portable_attention
from jaxmint.models._zoo import transformer as transformer

__all__ = [
    "LayerSummary",
    "Model",
    "ModelSummary",
    "activation_layout",
    "axes_by_path",
    "chunked_attention",
    "cnn",
    "constrain",
    "from_linen",
    "from_nnx",
    "join_variables",
    "mlp",
    "portable_attention",
    "remat",
    "split_variables",
    "summary",
    "transformer",
]
