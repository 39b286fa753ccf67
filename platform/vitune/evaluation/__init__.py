"""Benchmarks on top of batch inference: ScienceQA accuracy, LLaVA-Bench relative score, the judge, reports.

Submodules are imported where used; ``vitune.evaluation.run.run_evaluation`` is the job's entry point.
"""
