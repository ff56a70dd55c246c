"""Text side: `tokenizer` (Llama-3 BPE via tiktoken from a checkpoint's tokenizer.json), `chatml` (the upstream
ChatML rules: ids, labels, audio placeholders, TTS prompts)."""
