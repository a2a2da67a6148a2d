"""The pipeline stages, in order: ingest, dataset, train, evaluate, merge, and build, which chains them."""
