"""Scoring generated speech (issue 17): Whisper ASR -> WER/CER (`asr`, `whisper_text`, `normalize`, `wer`),
speaker similarity with a WavLM x-vector model (`speaker`), and the signals that need no model (`signals`)."""
