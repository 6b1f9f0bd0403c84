"""``jaxmint data``: convert arrays to file-backed datasets, and describe a dataset."""

from __future__ import annotations

from jaxmint.config import positive_int
from jaxmint.data import ByteWindows, RecordSource, convert, open_source


def _convert(args) -> int:
    source = convert(
        args.source,
        args.out,
        format=args.format,
        rows_per_shard=args.rows_per_shard,
        overwrite=args.overwrite,
    )
    print(f"wrote {source!r}")
    return 0


def _describe(source: RecordSource) -> str:
    first = source[0]
    keys = ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in first.items())
    return f"{source!r}\n  each record: {keys}"


def _info(args) -> int:
    source = ByteWindows(args.path, args.text) if args.text else open_source(args.path)
    print(_describe(source))
    return 0


def add_parsers(sub) -> None:
    data = sub.add_parser("data", help="convert arrays to .npy shards, ArrayRecord or Parquet")
    commands = data.add_subparsers(dest="data_command", required=True)
    p = commands.add_parser(
        "convert",
        help="write a .npz, a folder of KEY.npy files or a dataset as another format",
    )
    p.add_argument("source", help="a .npz file, a folder of KEY.npy files, or a dataset")
    p.add_argument("out", help="the dataset to write (a folder; a file for parquet)")
    p.add_argument("--format", choices=["npy", "arrayrecord", "parquet"], default="npy")
    p.add_argument(
        "--rows-per-shard",
        type=positive_int,
        default=65536,
        help="records per shard file (per row group for parquet)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    p.set_defaults(fn=_convert)
    p = commands.add_parser("info", help="records, keys, shapes and files of a dataset")
    p.add_argument("path")
    p.add_argument(
        "--text", type=positive_int, metavar="SEQ_LEN", help="read text files as byte windows"
    )
    p.set_defaults(fn=_info)
