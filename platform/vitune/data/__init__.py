"""Data: LLaVA records, conversation templates and label masks, tokenizers, synthetic data, inspection."""
