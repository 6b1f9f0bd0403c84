"""Data: a deterministic in-memory loader, device prefetch and embedded datasets."""

from jaxmint.data._datasets import digits as digits
from jaxmint.data._datasets import stdlib_chars as stdlib_chars
from jaxmint.data._datasets import stdlib_text as stdlib_text
from jaxmint.data._loader import ArrayLoader as ArrayLoader
from jaxmint.data._loader import BatchSpec as BatchSpec
from jaxmint.data._loader import DataError as DataError
from jaxmint.data._loader import TrainData as TrainData
from jaxmint.data._loader import check_input_range as check_input_range
from jaxmint.data._loader import eval_batches as eval_batches
from jaxmint.data._loader import prefetch_to_device as prefetch_to_device

__all__ = [
    "ArrayLoader",
    "BatchSpec",
    "DataError",
    "TrainData",
    "check_input_range",
    "digits",
    "eval_batches",
    "prefetch_to_device",
    "stdlib_chars",
    "stdlib_text",
]
