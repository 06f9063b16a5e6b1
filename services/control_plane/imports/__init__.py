"""Bulk imports: ``POST /v1/clusters/{id}/collections/{name}/imports`` (JSON Lines, Parquet, NumPy from S3 or
the local object store) run as a Celery task that validates the whole file, then upserts it in batches."""
