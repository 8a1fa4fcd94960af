"""The engine: requests in, scheduled steps out to the executor, outputs back."""
