"""hf-freqcompress: make timm and transformers models 10x-1000x smaller."""
