"""How the pipeline runs around the library: a local S3 server (SeaweedFS) and local Prefect/MLflow servers,
importable (`from infra.local_servers import ...`) and runnable as scripts (`python infra/s3_server.py`)."""
