"""What the eval and heldout stages score with: lm-eval on the offline task YAMLs, HumanEval in the
sandbox, exact match on the held-out split."""
