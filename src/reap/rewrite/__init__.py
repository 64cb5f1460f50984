"""The pruned checkpoint from a plan: the rewrite (surgery) and the output read back against its plan (verify)."""
