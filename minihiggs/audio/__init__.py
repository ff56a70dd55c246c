"""Audio front end: `io` (read, down-mix, resample as the reference does), `mel` (Whisper log-mel features)."""
