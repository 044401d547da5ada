"""Parquet files read in row batches, local or at an `s3://` URL: one opening and one check of the
columns for the text documents (`documents`) and the image records (`image_records`) alike."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from dbcore.data.location import open_file
from dbcore.errors import SourceError


@contextmanager
def parquet_batches(path: str, columns: Sequence[str], batch_rows: int
                    ) -> Iterator[tuple[Any, Iterator[tuple[int, Any]]]]:
    """`path` opened as Parquet, `columns` checked present: the file's Arrow schema, and its
    batches of those columns (in that order, `batch_rows` rows each) with each batch's first row.
    A file that is not Parquet, or lacks a column, is a SourceError naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open_file(path) as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as exc:
            raise SourceError(f"{path}: not a Parquet file ({exc})") from None
        schema = pf.schema_arrow
        for column in columns:
            if column not in schema.names:
                raise SourceError(f"{path}: no column {column!r} (columns: {schema.names})")

        def batches() -> Iterator[tuple[int, Any]]:
            row = 0
            for batch in pf.iter_batches(batch_size=batch_rows, columns=list(columns)):
                yield row, batch
                row += batch.num_rows

        yield schema, batches()
