"""imagemill pipelines."""
