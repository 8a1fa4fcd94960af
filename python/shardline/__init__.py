"""shardline: distributed LLM inference runtime."""
