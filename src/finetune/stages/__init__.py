"""Exactly the stages of ``dvc.yaml``, one module each, each with one public entry that reads top to bottom:
resolve the recipe's levers once into a plan, build, run, write."""
