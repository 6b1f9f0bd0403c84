"""Data: a deterministic in-memory loader, file-backed record sources read through Grain
pipelines, device prefetch and embedded datasets."""

from jaxmint.data._convert import convert as convert
from jaxmint.data._convert import open_source as open_source
from jaxmint.data._convert import read_arrays as read_arrays
from jaxmint.data._datasets import digits as digits
from jaxmint.data._datasets import stdlib_chars as stdlib_chars
from jaxmint.data._datasets import stdlib_text as stdlib_text
from jaxmint.data._files import NpyShards as NpyShards
from jaxmint.data._files import RecordSource as RecordSource
from jaxmint.data._files import write_npy_shards as write_npy_shards
from jaxmint.data._formats import ArrayRecordSource as ArrayRecordSource
from jaxmint.data._formats import ParquetSource as ParquetSource
from jaxmint.data._formats import write_array_record as write_array_record
from jaxmint.data._formats import write_parquet as write_parquet
from jaxmint.data._grain import first_examples as first_examples
from jaxmint.data._grain import pipeline as pipeline
from jaxmint.data._loader import ArrayLoader as ArrayLoader
from jaxmint.data._loader import BatchSpec as BatchSpec
from jaxmint.data._loader import DataError as DataError
from jaxmint.data._loader import check_input_range as check_input_range
from jaxmint.data._loader import eval_batches as eval_batches
from jaxmint.data._loader import prefetch_to_device as prefetch_to_device
from jaxmint.data._text import ByteWindows as ByteWindows
from jaxmint.data._train_data import TrainData as TrainData

__all__ = [
    "ArrayLoader",
    "ArrayRecordSource",
    "BatchSpec",
    "ByteWindows",
    "DataError",
    "NpyShards",
    "ParquetSource",
    "RecordSource",
    "TrainData",
    "check_input_range",
    "convert",
    "digits",
    "eval_batches",
    "first_examples",
    "open_source",
    "pipeline",
    "prefetch_to_device",
    "read_arrays",
    "stdlib_chars",
    "stdlib_text",
    "write_array_record",
    "write_npy_shards",
    "write_parquet",
]
