"""`python -m minihiggs.serve`: an OpenAI-compatible speech server (optional extra: `pip install -e .[serve]`).

voices.py  the voices of a directory (reference clip + transcript, a LoRA adapter, or both), checked at start-up
service.py the model, its adapters (one base, per-row LoRA), the continuous batcher thread, request building
app.py     the HTTP API (FastAPI): /v1/audio/speech, /v1/audio/voices, /v1/models, /health
"""
