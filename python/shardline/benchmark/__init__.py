"""The benchmark harness behind `shardline bench`: offline (every request at once) and
online (Poisson arrivals through AsyncLLM or an OpenAI-compatible server) runs, their
per-request measurements, and the JSON records and plots they leave."""
