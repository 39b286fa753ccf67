"""Instruction-data generation through any OpenAI-compatible LLM: inputs, prompts, parsing, the job."""
