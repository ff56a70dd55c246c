"""The Higgs Audio v2 model: `higgs` (backbone, DualFFN layers, embeddings, heads), `whisper` (audio tower),
`loss` (the fused dual loss head), `checkpoint` (`load_model`), `tiny` (small random checkpoints on disk)."""
