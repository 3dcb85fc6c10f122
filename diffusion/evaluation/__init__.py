"""Evaluation: prompt fidelity (detector + prompts) and attention localisation, with a report and a CLI."""
