"""Raw recordings -> cut, checked, transcribed segments and a ChatML manifest for prep.py (`python -m
minihiggs.ingest`): `segment` (where to cut), `loudness` (checks and normalising), `transcribe` (Whisper with its
confidence filters), `run` (the folder walk, the writes, resuming)."""
