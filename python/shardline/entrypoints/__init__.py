"""Network entry points: `shardline serve`, an OpenAI-compatible HTTP server over
AsyncLLM (app.py: routes; protocol.py: request bodies; serving.py: running requests and
shaping responses; prometheus.py: /metrics). Needs the `serve` extra (FastAPI, uvicorn)."""
